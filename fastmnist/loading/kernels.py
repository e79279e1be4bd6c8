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

AFFINE, ROTATION = 0.0, 1.0  # affine_nearest's config[0]


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

    jit = numba.njit(cache=True, nogil=True, boundscheck=False)

    @jit
    def mix(z):  # augment._mix, on one uint64
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    @jit
    def draw(sample, d):  # augment.uniforms for one sample (its key mixed in) and draw
        return np.float64(mix(sample ^ np.uint64(d)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)

    @jit
    def uniform(u, low, high):  # augment._uniform
        return np.float32(low + (high - low) * u)

    @jit
    def normalise(v, norm, reciprocal):  # formats.normalize, on one pixel
        scaled = np.float32(v) * norm[0] if reciprocal else np.float32(v) / norm[0]
        return (scaled - norm[1]) / norm[2]

    @jit
    def normalise_row(source, framed, norm, reciprocal):  # two loops: each one vectorises
        if reciprocal:
            for p in range(source.shape[0]):
                framed[p] = (np.float32(source[p]) * norm[0] - norm[1]) / norm[2]
        else:
            for p in range(source.shape[0]):
                framed[p] = (np.float32(source[p]) / norm[0] - norm[1]) / norm[2]

    @jit
    def inverse_affine(cx, cy, angle, tx, ty, scale, shear_x, shear_y, m):
        # augment._inverse_affine for one sample (float64), into m (6,)
        rad = np.pi / 180.0
        rot, sx, sy = angle * rad, shear_x * rad, shear_y * rad
        cos_sy, tan_sx, rot_minus_sy = np.cos(sy), np.tan(sx), rot - sy
        cx_plus_tx, cy_plus_ty = cx + tx, cy + ty
        a = np.cos(rot_minus_sy) / cos_sy
        b = -(a * tan_sx + np.sin(rot))
        c = np.sin(rot_minus_sy) / cos_sy
        d = np.cos(rot) - c * tan_sx
        m[0], m[1], m[3], m[4] = d / scale, -b / scale, -c / scale, a / scale
        m[2] = 0.0 + (cx - m[0] * cx_plus_tx - m[1] * cy_plus_ty)
        m[5] = 0.0 + (cy - m[3] * cx_plus_tx - m[4] * cy_plus_ty)

    @jit
    def affine_nearest(images, indices, key, config, base, fill, norm, reciprocal, out):
        side = images.shape[1]
        pixels = side * side
        one, half_side, half = np.float32(1.0), np.float32(side / 2), np.float32(0.5)
        zero, fside, fpixels = np.float32(0.0), np.float32(side), np.float32(pixels)
        fourteen = np.float32(side * 0.5)
        flat, flat_out = images.reshape(images.shape[0], pixels), out.reshape(images.shape[0], pixels)
        framed = np.empty(pixels + 1, np.float32)  # the sample's pixels normalised, then fill
        framed[pixels] = normalise(fill, norm, reciprocal)
        where = np.empty(pixels, np.int32)
        m = np.zeros(6)
        cx, cy = config[14], config[15]
        for b in range(images.shape[0]):
            sample = mix(key ^ np.uint64(indices[b]))
            quarter = -1
            if config[0] == AFFINE:  # augment._Affine.params, then its matrix
                angle = np.float64(uniform(draw(sample, 0), config[1], config[2]))
                tx = ty = shear_x = shear_y = 0.0
                if config[3] != 0.0:
                    tx = np.rint(np.float64(uniform(draw(sample, 1), -config[4], config[4])))
                    ty = np.rint(np.float64(uniform(draw(sample, 2), -config[5], config[5])))
                if config[6] != 0.0:
                    scale = np.float64(uniform(draw(sample, 3), config[7], config[8]))
                else:
                    scale = 1.0
                if config[9] >= 2:
                    shear_x = np.float64(uniform(draw(sample, 4), config[10], config[11]))
                if config[9] == 4:
                    shear_y = np.float64(uniform(draw(sample, 5), config[12], config[13]))
                inverse_affine(cx, cy, angle, tx, ty, scale, shear_x, shear_y, m)
            else:  # augment._Rotation
                angle = np.float64(uniform(draw(sample, 0), config[1], config[2])) % 360.0
                inverse_affine(cx, cy, -angle, 0.0, 0.0, 1.0, 0.0, 0.0, m)
                if config[16] != 0.0 and angle < 360.0 and angle % 90.0 == 0.0:
                    quarter = int(angle // 90.0)
            normalise_row(flat[b], framed, norm, reciprocal)
            if quarter >= 0:  # torch.rot90's exact quarter turns, as torchvision's rotate
                last = side - 1
                for i in range(side):
                    for j in range(side):
                        if quarter == 0:
                            where[i * side + j] = i * side + j
                        elif quarter == 1:
                            where[i * side + j] = j * side + last - i
                        elif quarter == 2:
                            where[i * side + j] = (last - i) * side + last - j
                        else:
                            where[i * side + j] = (last - j) * side + i
            else:  # torchvision's grid (_affine_grid's float32 roundings), rounded half to even
                s00, s10 = np.float32(m[0]) / fourteen, np.float32(m[1]) / fourteen
                s20, s01 = np.float32(m[2]) / fourteen, np.float32(m[3]) / fourteen
                s11, s21 = np.float32(m[4]) / fourteen, np.float32(m[5]) / fourteen
                for i in range(side):  # a loop the compiler vectorises
                    along_y0, along_y1 = base[i] * s10, base[i] * s11
                    for j in range(side):
                        ix = np.rint(((base[j] * s00 + along_y0) + s20 + one) * half_side - half)
                        iy = np.rint(((base[j] * s01 + along_y1) + s21 + one) * half_side - half)
                        inside = (ix >= zero) & (ix < fside) & (iy >= zero) & (iy < fside)  # NaN: outside
                        where[i * side + j] = np.int32(iy * fside + ix if inside else fpixels)
            row = flat_out[b]
            for p in range(pixels):  # then the gather
                row[p] = framed[where[p]]

    @jit
    def shifted(images, indices, key, config, fill, norm, reciprocal, out):
        side = images.shape[1]
        outside = normalise(fill, norm, reciprocal)
        framed = np.empty(side, np.float32)
        for b in range(images.shape[0]):
            sample = mix(key ^ np.uint64(indices[b]))  # augment._Crop.params (_randint)
            top = min(np.int64(np.floor(draw(sample, 0) * config[0])), np.int64(config[0]) - 1)
            left = min(np.int64(np.floor(draw(sample, 1) * config[1])), np.int64(config[1]) - 1)
            dy, dx = top - np.int64(config[2]), left - np.int64(config[3])
            first, stop = min(max(-dx, 0), side), max(min(side - dx, side), 0)  # columns inside
            for i in range(side):
                iy = i + dy
                if iy < 0 or iy >= side:
                    out[b, i, :] = outside
                    continue
                normalise_row(images[b, iy], framed, norm, reciprocal)
                out[b, i, :first] = outside
                for j in range(first, stop):
                    out[b, i, j] = framed[j + dx]
                out[b, i, stop:] = outside

    return {"affine_nearest": affine_nearest, "shifted": shifted}


def affine_nearest(images: np.ndarray, indices: np.ndarray, key: np.uint64, config: np.ndarray, fill: int,
                   norm: np.ndarray, reciprocal: bool, out: np.ndarray) -> np.ndarray:
    """uint8 ``images`` ``(B, 28, 28)`` -> float32 ``out`` (same shape): each sample's
    ``RandomAffine`` or ``RandomRotation`` drawn (``config``: float64, as
    ``augment._Affine.kernel_config`` lays it out), resampled nearest through torchvision's
    affine grid (rounded half to even, as ``grid_sample`` rounds), ``fill`` (uint8) outside,
    and normalised."""
    shared = (key, config, _base(), np.uint8(fill), norm, reciprocal)
    return _run("affine_nearest", (images, indices), shared, out)


def shifted(images: np.ndarray, indices: np.ndarray, key: np.uint64, config: np.ndarray, fill: int,
            norm: np.ndarray, reciprocal: bool, out: np.ndarray) -> np.ndarray:
    """uint8 ``images`` ``(B, 28, 28)`` -> float32 ``out`` (same shape): each sample's padded
    ``RandomCrop`` drawn (``config`` float64: the top and left offsets' counts, then the top
    and left padding), ``fill`` (uint8) in the padding, and normalised."""
    return _run("shifted", (images, indices), (key, config, np.uint8(fill), norm, reciprocal), out)


def norm(mean: float, std: float, reciprocal: bool) -> np.ndarray:
    """float32 ``(3,)``: the kernels' ``norm`` for ``formats.normalize``'s arithmetic."""
    return np.array([1 / 255 if reciprocal else 255, mean, std], np.float32)


def _base() -> np.ndarray:
    """float32 ``(28,)``: torchvision's base grid coordinates, ``-13.5 .. 13.5`` (as
    ``torch.linspace`` makes them: whole and half numbers, exact)."""
    return np.arange(28, dtype=np.float32) - np.float32(13.5)


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
