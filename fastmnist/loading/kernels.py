"""Fused CPU kernels for the augmentation path (numba, the ``jit`` extra): one pass per batch
from the uint8 source to the normalised float32 output, the parameters drawn inside, each
float32 and float64 operation torchvision's (and ``augment.py``'s) in the same order, so the
bits are the torch path's.

numba is imported on first use, never by ``import fastmnist``; without it, or with the
environment variable ``FASTMNIST_JIT=0`` (``available()`` false), the torch path in
``augment.py`` runs. Kernels are compiled once per machine and cached (``cache=True``).

Shared arguments: ``indices`` int64 ``(B,)`` the samples' indices and ``key`` the step's
uint64 key (``augment.step_key``), from which draw ``d`` of a sample is ``augment.uniforms``'s;
``norm`` float32 ``(3,)``: 255 (or ``1 / 255`` when ``reciprocal``), mean, std, the
normalisation as ``formats.normalize`` computes it.
"""

import functools
import os

import numpy as np

AFFINE, ROTATION = 0.0, 1.0  # the affine kernel's config[0]
NEAREST, BILINEAR, BILINEAR_FMA = 0, 1, 2  # the kernels' resampling modes


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


def _compiled(name: str, mode: int | None = None):
    """Kernel ``name`` of ``numba_kernels``, for resampling ``mode`` where it resamples (one
    compiled kernel per mode: a cold first batch compiles only its own, 2.2 s for nearest
    affine against 3.9 s for all modes in one)."""
    from . import numba_kernels

    return getattr(numba_kernels, name) if mode is None else getattr(numba_kernels, f"{name}_for")(mode)


@functools.cache
def bilinear_rounding() -> bool | None:
    """How torch's CPU ``grid_sample`` rounds a bilinear sample on this machine, which the
    bilinear kernel must repeat: True where it runs its AVX2 or AVX-512 kernel (fused
    multiply-adds in the unnormalisation and the weighted sum), False its default kernel on
    x86-64 (none); None on other machines, where the torch path runs (not compared)."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return {"AVX2": True, "AVX512": True, "DEFAULT": False}.get(torch.backends.cpu.get_cpu_capability())


def mode(interpolation: str) -> int | None:
    """The kernels' resampling mode for torchvision's ``interpolation`` ("nearest" or
    "bilinear") here: bilinear as ``bilinear_rounding()`` says torch rounds it, None (the
    torch path) where that is not known."""
    if interpolation == "nearest":
        return NEAREST
    return {True: BILINEAR_FMA, False: BILINEAR, None: None}[bilinear_rounding()]


def affine(images: np.ndarray, rows: np.ndarray, indices: np.ndarray, key: np.uint64, config: np.ndarray,
           base: np.ndarray, fill: float, mode: int, norm: np.ndarray, reciprocal: bool,
           out: np.ndarray) -> np.ndarray:
    """uint8 ``images`` ``(N, 28, 28)`` -> float32 ``out`` ``(B, 28, 28)``: each sample (image
    ``rows[b]``) with its ``RandomAffine`` or ``RandomRotation`` drawn, resampled through
    torchvision's affine grid (``base``: its float32 ``(28,)`` coordinates) as ``mode`` says,
    ``fill`` outside (a whole number for ``NEAREST``), and normalised. ``config`` float64
    ``(17,)``: ``AFFINE`` or ``ROTATION``; the degrees' range; translate given (1/0) and its
    limits in pixels (x, y); scale given and its range; the number of shear values (0, 2, 4)
    and four values; the centre relative to the image centre (x, y); centred (1/0: a rotation
    by a multiple of 90 degrees is an exact turn)."""
    shared = (key, config, base, np.float32(fill), norm, reciprocal)
    return _run(_compiled("affine", mode), images, (rows, indices), shared, out)


def perspective(images: np.ndarray, rows: np.ndarray, coefficients: np.ndarray, applied: np.ndarray,
                base: np.ndarray, fill: float, mode: int, norm: np.ndarray, reciprocal: bool,
                out: np.ndarray) -> np.ndarray:
    """``affine``'s resampling through torchvision's perspective grid of each sample's float32
    ``coefficients`` ``(B, 8)`` (``base``: the grid's float32 ``(28,)`` coordinates) where
    ``applied[b]`` (bool), the sample only normalised where not."""
    shared = (base, np.float32(fill), norm, reciprocal)
    return _run(_compiled("perspective", mode), images, (rows, coefficients, applied), shared, out)


def perspective_coefficients(ends: np.ndarray, systems: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 end points ``(B, 4, 2)`` and the float64 systems ``(B, 8, 8)`` gels solves for
    them (``augment._perspective_system``) -> float32 ``(B, 8)``, torchvision's perspective
    coefficients (gels' solution made float32) where bool ``(B,)`` says they are certain: the
    exact solution, away from any float32 rounding boundary by more than gels' error bound
    (see ``numba_kernels.perspective_coefficients``); elsewhere undefined."""
    out, certain = np.empty((len(ends), 8), np.float32), np.empty(len(ends), np.bool_)
    _compiled("perspective_coefficients")(np.ascontiguousarray(ends, np.int64), systems, out, certain)
    return out, certain


def elastic(images: np.ndarray, rows: np.ndarray, indices: np.ndarray, key: np.uint64, weights: np.ndarray,
            sizes: np.ndarray, alpha: np.ndarray, side: np.ndarray, fill: float, mode: int, norm: np.ndarray,
            reciprocal: bool, out: np.ndarray) -> np.ndarray:
    """``affine``'s resampling through each sample's ``ElasticTransform`` grid: its noise
    drawn, blurred along x then y by float32 ``weights`` ``(2, 2, K)`` (x field then y field;
    x pass then y pass) of ``sizes`` int64 ``(2,)`` taps (0: not blurred), scaled by float32
    ``alpha`` ``(2,)`` / 28, and added to the identity grid ``side`` (float32 ``(28,)``)."""
    shared = (key, weights, sizes, alpha, side, np.float32(fill), norm, reciprocal)
    return _run(_compiled("elastic", mode), images, (rows, indices), shared, out)


def shifted(images: np.ndarray, rows: np.ndarray, indices: np.ndarray, key: np.uint64, config: np.ndarray,
            fill: int, norm: np.ndarray, reciprocal: bool, out: np.ndarray) -> np.ndarray:
    """uint8 ``images`` ``(N, 28, 28)`` -> float32 ``out`` ``(B, 28, 28)``: each sample (image
    ``rows[b]``) with its padded ``RandomCrop`` drawn (``config`` float64: the top and left
    offsets' counts, then the top and left padding), ``fill`` (uint8) in the padding, and
    normalised."""
    shared = (key, config, np.uint8(fill), norm, reciprocal)
    return _run(_compiled("shifted"), images, (rows, indices), shared, out, split=False)


def norm(mean: float, std: float, reciprocal: bool) -> np.ndarray:
    """float32 ``(3,)``: the kernels' ``norm`` for ``formats.normalize``'s arithmetic."""
    return np.array([1 / 255 if reciprocal else 255, mean, std], np.float32)


def _run(kernel, images: np.ndarray, per_sample: tuple, shared: tuple, out: np.ndarray,
         split: bool = True) -> np.ndarray:
    """``kernel(images, *per_sample, *shared, out)``; ``per_sample[0]``: the
    samples' rows of ``images``, checked (the kernels do not check bounds). With ``split``,
    the samples (the rows of ``per_sample`` and ``out``) are divided among
    ``torch.get_num_threads()`` threads (one in DataLoader workers), at least 64 each; without
    it (the crop, 0.2 us a sample, which lost to the hand-off what it gained: 1.12 -> 0.88 of
    the plain loader) they run on this thread."""
    import torch

    rows, n = per_sample[0], len(out)
    if n and (rows.min() < 0 or rows.max() >= len(images)):
        raise IndexError(f"{kernel.__name__}: rows {rows.min()}..{rows.max()} outside the {len(images)} "
                         "images")
    threads = max(1, min(torch.get_num_threads(), n // 64)) if split else 1
    cuts = np.linspace(0, n, threads + 1).astype(int)
    parts = [(images, *(a[lo:hi] for a in per_sample), *shared, out[lo:hi])
             for lo, hi in zip(cuts, cuts[1:], strict=False)]
    others = [_pool(threads - 1).submit(kernel, *part) for part in parts[1:]]
    kernel(*parts[0])  # this thread takes a share too
    for done in others:
        done.result()
    return out


_pools = {}  # (process, threads) -> executor: a forked DataLoader worker makes its own


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    key = (os.getpid(), threads)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="fastmnist-kernel")
    return _pools[key]
