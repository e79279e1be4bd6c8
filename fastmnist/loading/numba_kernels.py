"""The numba kernels behind ``kernels.py`` (imported by it on first use; see there for the
arguments). Each helper is inlined into the kernels, so a kernel is one compiled loop nest."""

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

from . import augment
from .kernels import AFFINE

jit = numba.njit(cache=True, nogil=True, boundscheck=False)
inline = numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")


@inline
def mix(z):  # augment._mix, on one uint64
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@inline
def draw(sample, d):  # augment.uniforms for one sample (its key mixed in) and draw
    return np.float64(mix(sample ^ np.uint64(d)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@inline
def uniform(u, low, high):  # augment._uniform
    return np.float32(low + (high - low) * u)


@inline
def normalise(v, unit, mean, std, reciprocal):  # formats.normalize, on one pixel
    scaled = np.float32(v) * unit if reciprocal else np.float32(v) / unit
    return (scaled - mean) / std


@inline
def normalise_into(source, target, offset, unit, mean, std, reciprocal):
    """target[offset + p] = source[p] normalised, for each p (each loop vectorises)."""
    if reciprocal:
        for p in range(source.shape[0]):
            target[np.uint64(offset + p)] = (np.float32(source[p]) * unit - mean) / std
    else:
        for p in range(source.shape[0]):
            target[np.uint64(offset + p)] = (np.float32(source[p]) / unit - mean) / std


inverse_affine = inline(augment.inverse_affine)

AHEAD = 4  # samples whose pixels are fetched into the caches ahead of their turn


@intrinsic
def prefetch(typingctx, array, offset):
    """Bring element ``offset`` of the C-contiguous ``array`` (counted over all of it) into
    the caches (``llvm.prefetch``: a hint, never a fault)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte = ir.IntType(8).as_pointer()
        word = ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", [byte], ir.FunctionType(
            ir.VoidType(), [byte, word, word, word]))
        builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), byte), word(0), word(3), word(1)])
        return context.get_dummy_value()
    return numba.types.void(array, offset), codegen


@inline
def fetch_ahead(flat, rows, b):  # sample b's cache lines, if there is a sample b
    if b < rows.shape[0]:
        start, size = rows[b] * flat.shape[1], flat.shape[1]
        for line in range(0, size + 63, 64):
            prefetch(flat, start + min(line, size - 1))


@jit
def affine_nearest(images, rows, indices, key, config, base, fill, norm, reciprocal, out):
    side = images.shape[1]
    pixels = side * side
    one, half_side, half = np.float32(1.0), np.float32(side / 2), np.float32(0.5)
    zero, fside, fpixels = np.float32(0.0), np.float32(side), np.float32(pixels)
    flat, flat_out = images.reshape(images.shape[0], pixels), out.reshape(out.shape[0], pixels)
    unit, mean, std = norm[0], norm[1], norm[2]  # scalars: stores into framed cannot change them
    framed = np.empty(pixels + 1, np.float32)  # the sample's pixels normalised, then fill
    framed[pixels] = normalise(fill, unit, mean, std, reciprocal)
    where = np.empty(pixels, np.uint32)
    xs, ys = np.empty(pixels, np.float32), np.empty(pixels, np.float32)  # each pixel's base grid x, y
    for p in range(pixels):
        xs[p], ys[p] = base[p % side], base[p // side]
    cx, cy = config[14], config[15]
    for b in range(out.shape[0]):
        fetch_ahead(flat, rows, b + AHEAD)
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
            m = inverse_affine(cx, cy, angle, tx, ty, scale, shear_x, shear_y)
        else:  # augment._Rotation
            angle = np.float64(uniform(draw(sample, 0), config[1], config[2])) % 360.0
            m = inverse_affine(cx, cy, -angle, 0.0, 0.0, 1.0, 0.0, 0.0)
            if config[16] != 0.0 and angle < 360.0 and angle % 90.0 == 0.0:
                quarter = int(angle // 90.0)
        normalise_into(flat[rows[b]], framed, 0, unit, mean, std, reciprocal)
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
            s00, s10 = np.float32(m[0]) / half_side, np.float32(m[1]) / half_side
            s20, s01 = np.float32(m[2]) / half_side, np.float32(m[3]) / half_side
            s11, s21 = np.float32(m[4]) / half_side, np.float32(m[5]) / half_side
            for p in range(pixels):  # one flat loop, which the compiler vectorises (rows of 28 it does not)
                ix = np.rint(((xs[p] * s00 + ys[p] * s10) + s20 + one) * half_side - half)
                iy = np.rint(((xs[p] * s01 + ys[p] * s11) + s21 + one) * half_side - half)
                inside = (ix >= zero) & (ix < fside) & (iy >= zero) & (iy < fside)  # NaN: outside
                where[p] = np.uint32(iy * fside + ix if inside else fpixels)
        row = flat_out[b]
        for p in range(pixels):  # then the gather
            row[p] = framed[where[p]]


@jit
def shifted(images, rows, indices, key, config, fill, norm, reciprocal, out):
    side = images.shape[1]
    unit, mean, std = norm[0], norm[1], norm[2]
    pixels = side * side
    flat, flat_out = images.reshape(images.shape[0], pixels), out.reshape(out.shape[0], pixels)
    filled = normalise(fill, unit, mean, std, reciprocal)
    counts = np.int64(config[0]), np.int64(config[1])
    padding = np.int64(config[2]), np.int64(config[3])
    # Output pixel p is the sample's pixel p + shift (dy rows and dx columns on) where that is
    # inside: one contiguous load per pixel from the normalised sample, in a buffer with a
    # margin wider than any shift, then a select of fill.
    margin = max(padding[0], counts[0] - 1 - padding[0]) * side + max(padding[1], counts[1] - 1 - padding[1])
    shifted_by = np.zeros(pixels + 2 * margin, np.float32)
    row_of, column_of = np.empty(pixels, np.int64), np.empty(pixels, np.int64)
    for p in range(pixels):
        row_of[p], column_of[p] = p // side, p % side
    for b in range(out.shape[0]):
        fetch_ahead(flat, rows, b + AHEAD)
        sample = mix(key ^ np.uint64(indices[b]))  # augment._Crop.params (_randint)
        top = min(np.int64(np.floor(draw(sample, 0) * config[0])), counts[0] - 1)
        left = min(np.int64(np.floor(draw(sample, 1) * config[1])), counts[1] - 1)
        dy, dx = top - padding[0], left - padding[1]
        normalise_into(flat[rows[b]], shifted_by, margin, unit, mean, std, reciprocal)
        start, row = margin + dy * side + dx, flat_out[b]
        for p in range(pixels):  # vectorised: contiguous loads, a select
            y, x = row_of[p] + dy, column_of[p] + dx
            value = shifted_by[np.uint64(start + p)]
            row[p] = value if (y >= 0) & (y < side) & (x >= 0) & (x < side) else filled
