"""Fused CPU kernels for the augmentation path (numba, the ``jit`` extra): one pass per batch
from the uint8 source to the normalised float32 output, performing torchvision's float32
operations in torchvision's order, so the bits are the torch path's.

numba is imported on first use, never by ``import fastmnist``; without it, or with the
environment variable ``FASTMNIST_JIT=0`` (``available()`` false), the torch path in
``augment.py`` runs. Kernels are compiled once per machine and cached (``cache=True``).
"""

import functools
import os

import numpy as np


@functools.cache
def available() -> bool:
    """Whether the kernels run: numba can be imported (the ``jit`` extra) and
    ``FASTMNIST_JIT`` is not "0"."""
    if os.environ.get("FASTMNIST_JIT", "1") == "0":
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled():
    import numba

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def affine_nearest(images, scaled, base, fill, table, out):
        one, half_side, half = np.float32(1.0), np.float32(images.shape[2] / 2), np.float32(0.5)
        side = images.shape[1]
        for b in range(images.shape[0]):
            s00, s10, s20 = scaled[b, 0, 0], scaled[b, 1, 0], scaled[b, 2, 0]
            s01, s11, s21 = scaled[b, 0, 1], scaled[b, 1, 1], scaled[b, 2, 1]
            for i in range(side):
                along_y0, along_y1 = base[i] * s10, base[i] * s11
                for j in range(side):
                    gx = (base[j] * s00 + along_y0) + s20
                    gy = (base[j] * s01 + along_y1) + s21
                    ix = np.rint((gx + one) * half_side - half)
                    iy = np.rint((gy + one) * half_side - half)
                    if 0 <= ix < side and 0 <= iy < side:
                        out[b, i, j] = table[images[b, int(iy), int(ix)]]
                    else:  # outside, or NaN
                        out[b, i, j] = table[fill]

    return affine_nearest


def affine_nearest(images: np.ndarray, scaled: np.ndarray, base: np.ndarray, fill: int, table: np.ndarray,
                   out: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of uint8 ``images`` ``(B, 28, 28)`` through torchvision's
    affine grid into ``out`` ``(B, 28, 28)`` (the dtype of ``table``): output pixel ``(i, j)``
    of sample ``b`` is ``table[v]``, ``v`` the source pixel at the grid point
    ``base[j] * scaled[b, 0] + base[i] * scaled[b, 1] + scaled[b, 2]`` (float32 ``(B, 3, 2)``:
    the inverse affine matrix transposed and divided by half the side, as ``_affine_grid``
    makes it), unnormalised and rounded half to even as ``grid_sample``'s nearest does, or
    ``fill`` (uint8) outside. ``table``: 256 entries, the normalisation (float32) or the
    identity (uint8)."""
    _compiled()(images, scaled, base, np.uint8(fill), table, out)
    return out
