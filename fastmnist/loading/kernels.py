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
        pixels = side * side
        flat, flat_out = images.reshape(images.shape[0], pixels), out.reshape(images.shape[0], pixels)
        framed = np.empty(pixels + 1, np.uint8)  # the sample's pixels, then fill
        framed[pixels] = fill
        where = np.empty(pixels, np.int64)
        for b in range(images.shape[0]):
            s00, s10, s20 = scaled[b, 0, 0], scaled[b, 1, 0], scaled[b, 2, 0]
            s01, s11, s21 = scaled[b, 0, 1], scaled[b, 1, 1], scaled[b, 2, 1]
            framed[:pixels] = flat[b]
            for i in range(side):  # where each output pixel comes from (a loop the compiler vectorises)
                along_y0, along_y1 = base[i] * s10, base[i] * s11
                for j in range(side):
                    ix = np.rint(((base[j] * s00 + along_y0) + s20 + one) * half_side - half)
                    iy = np.rint(((base[j] * s01 + along_y1) + s21 + one) * half_side - half)
                    inside = (ix >= 0) & (ix < side) & (iy >= 0) & (iy < side)  # NaN: outside
                    where[i * side + j] = np.int64(iy * side + ix) if inside else pixels
            for p in range(pixels):  # then the gather and the table
                flat_out[b, p] = table[framed[where[p]]]

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def shifted(images, rows, columns, fill, table, out):
        side, outside = images.shape[1], table[fill]
        for b in range(images.shape[0]):
            dx = columns[b]
            first, stop = min(max(-dx, 0), side), max(min(side - dx, side), 0)  # columns inside
            for i in range(side):
                iy = i + rows[b]
                if iy < 0 or iy >= side:
                    out[b, i, :] = outside
                    continue
                out[b, i, :first] = outside
                for j in range(first, stop):
                    out[b, i, j] = table[images[b, iy, j + dx]]
                out[b, i, stop:] = outside

    return {"affine_nearest": affine_nearest, "shifted": shifted}


def shifted(images: np.ndarray, rows: np.ndarray, columns: np.ndarray, fill: int, table: np.ndarray,
            out: np.ndarray) -> np.ndarray:
    """uint8 ``images`` ``(B, 28, 28)`` moved into ``out`` (the dtype of ``table``): output
    pixel ``(i, j)`` of sample ``b`` is ``table[v]``, ``v`` the source pixel at row
    ``i + rows[b]``, column ``j + columns[b]`` (int64 ``(B,)``), or ``fill`` outside: a
    padded ``RandomCrop``."""
    return _run("shifted", (images, rows, columns), (np.uint8(fill), table), out)


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
    return _run("affine_nearest", (images, scaled), (base, np.uint8(fill), table), out)


def _run(name: str, per_sample: tuple, shared: tuple, out: np.ndarray) -> np.ndarray:
    """``kernel(*per_sample, *shared, out)`` for kernel ``name``, the samples (the rows of
    ``per_sample`` and ``out``) divided among ``torch.get_num_threads()`` threads (one in
    DataLoader workers), at least 64 each."""
    import torch

    kernel, n = _compiled()[name], len(out)
    threads = max(1, min(torch.get_num_threads(), n // 64))
    cuts = np.linspace(0, n, threads + 1).astype(int)
    parts = [(*(a[lo:hi] for a in per_sample), *shared, out[lo:hi])
             for lo, hi in zip(cuts, cuts[1:], strict=False)]
    if threads == 1:
        kernel(*parts[0])
    else:
        list(_pool(threads).map(lambda part: kernel(*part), parts))
    return out


_pools = {}  # (process, threads) -> executor: a forked DataLoader worker makes its own


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    key = (os.getpid(), threads)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="fastmnist-kernel")
    return _pools[key]
