"""The numba kernels behind ``kernels.py`` (imported by it on first use; see there for the
arguments). Each helper is inlined into the kernels, so a kernel is one compiled loop nest."""

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

from ..formats.idx import IMAGE_SIDE as SIDE
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
    """target[offset + p] = source[p] normalised, for each p (the loop vectorises)."""
    for p in range(source.shape[0]):
        target[np.uint64(offset + p)] = normalise(source[p], unit, mean, std, reciprocal)


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


@intrinsic
def fma(typingctx, a, b, c):
    """float32 ``a * b + c`` rounded once (``llvm.fma``), as torch's AVX2 kernels compute it."""
    def codegen(context, builder, signature, args):
        single = ir.FloatType()
        return builder.call(builder.module.declare_intrinsic(
            "llvm.fma", [single], ir.FunctionType(single, [single] * 3)), args)
    return numba.types.float32(numba.types.float32, numba.types.float32, numba.types.float32), codegen


@inline
def matrix(config, sample):
    """augment._Affine.params or _Rotation.params for the sample, then its inverse matrix
    scaled as torchvision's grid takes it (float32 s00, s10, s20, s01, s11, s21), and the
    exact quarter turn it is (0-3), or -1."""
    cx, cy = config[14], config[15]
    quarter = -1
    if config[0] == AFFINE:
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
    else:
        angle = np.float64(uniform(draw(sample, 0), config[1], config[2])) % 360.0
        m = inverse_affine(cx, cy, -angle, 0.0, 0.0, 1.0, 0.0, 0.0)
        if config[16] != 0.0 and angle < 360.0 and angle % 90.0 == 0.0:
            quarter = int(angle // 90.0)
    half_side = np.float32(SIDE / 2)
    return (np.float32(m[0]) / half_side, np.float32(m[1]) / half_side, np.float32(m[2]) / half_side,
            np.float32(m[3]) / half_side, np.float32(m[4]) / half_side, np.float32(m[5]) / half_side), quarter


@inline
def quarter_turn(where, quarter):  # where[p]: the source pixel of p under torch.rot90's exact turn
    last = SIDE - 1
    for i in range(SIDE):
        for j in range(SIDE):
            if quarter == 0:
                where[i * SIDE + j] = i * SIDE + j
            elif quarter == 1:
                where[i * SIDE + j] = j * SIDE + last - i
            elif quarter == 2:
                where[i * SIDE + j] = (last - i) * SIDE + last - j
            else:
                where[i * SIDE + j] = (last - j) * SIDE + i


@inline
def base_grid(base):  # each pixel's base grid x and y, float32 (784,) each
    xs, ys = np.empty(SIDE * SIDE, np.float32), np.empty(SIDE * SIDE, np.float32)
    for p in range(SIDE * SIDE):
        xs[p], ys[p] = base[p % SIDE], base[p // SIDE]
    return xs, ys


@jit
def affine_nearest(images, rows, indices, key, config, base, fill, norm, reciprocal, out):
    pixels = SIDE * SIDE
    one, half_side, half = np.float32(1.0), np.float32(SIDE / 2), np.float32(0.5)
    zero, fside, fpixels = np.float32(0.0), np.float32(SIDE), np.float32(pixels)
    flat, flat_out = images.reshape(images.shape[0], pixels), out.reshape(out.shape[0], pixels)
    unit, mean, std = norm[0], norm[1], norm[2]  # scalars: stores into framed cannot change them
    framed = np.empty(pixels + 1, np.float32)  # the sample's pixels normalised, then fill
    framed[pixels] = normalise(fill, unit, mean, std, reciprocal)
    where = np.empty(pixels, np.uint32)
    xs, ys = base_grid(base)
    for b in range(out.shape[0]):
        fetch_ahead(flat, rows, b + AHEAD)
        (s00, s10, s20, s01, s11, s21), quarter = matrix(config, mix(key ^ np.uint64(indices[b])))
        normalise_into(flat[rows[b]], framed, 0, unit, mean, std, reciprocal)
        if quarter >= 0:
            quarter_turn(where, quarter)
        else:  # torchvision's grid (_affine_grid's float32 roundings), rounded half to even
            for p in range(pixels):  # one flat loop, which the compiler vectorises (rows of 28 it does not)
                ix = np.rint(((xs[p] * s00 + ys[p] * s10) + s20 + one) * half_side - half)
                iy = np.rint(((xs[p] * s01 + ys[p] * s11) + s21 + one) * half_side - half)
                inside = (ix >= zero) & (ix < fside) & (iy >= zero) & (iy < fside)  # NaN: outside
                where[p] = np.uint32(iy * fside + ix if inside else fpixels)
        row = flat_out[b]
        for p in range(pixels):  # then the gather
            row[p] = framed[where[p]]


@jit
def affine_bilinear(images, rows, indices, key, config, base, fill, fused, norm, reciprocal, out):
    pixels = SIDE * SIDE
    one, zero, half_side, half = np.float32(1.0), np.float32(0.0), np.float32(SIDE / 2), np.float32(0.5)
    fside, fpixels, last = np.float32(SIDE), np.float32(pixels), np.float32(SIDE - 1)
    flat, flat_out = images.reshape(images.shape[0], pixels), out.reshape(out.shape[0], pixels)
    unit, mean, std = norm[0], norm[1], norm[2]
    framed = np.zeros(pixels + 1, np.float32)  # the sample's pixels as float32, then 0 (outside)
    xs, ys = base_grid(base)
    where = np.empty((4, pixels), np.uint32)  # each pixel's four neighbours (or the 0 past the end)
    weight = np.empty((4, pixels), np.float32)  # and their weights: nw, ne, sw, se
    value = np.empty(pixels, np.float32)  # the resampled pixel, rounded as the uint8 it becomes
    for b in range(out.shape[0]):
        fetch_ahead(flat, rows, b + AHEAD)
        (s00, s10, s20, s01, s11, s21), quarter = matrix(config, mix(key ^ np.uint64(indices[b])))
        source = flat[rows[b]]
        for p in range(pixels):
            framed[p] = np.float32(source[p])
        row = flat_out[b]
        if quarter >= 0:
            quarter_turn(where[0], quarter)
            for p in range(pixels):
                value[p] = framed[where[0, p]]
        else:  # grid_sample's bilinear, as torch's CPU kernel rounds it (fused: its AVX2/AVX-512 build)
            for p in range(pixels):  # vectorised: positions, weights, neighbours
                gx, gy = (xs[p] * s00 + ys[p] * s10) + s20, (xs[p] * s01 + ys[p] * s11) + s21
                if fused:
                    x, y = fma(gx + one, half_side, -half), fma(gy + one, half_side, -half)
                else:
                    x, y = (gx + one) * half_side - half, (gy + one) * half_side - half
                left, top = np.floor(x), np.floor(y)
                east, south = x - left, y - top
                west, north = one - east, one - south
                weight[0, p], weight[1, p] = north * west, north * east
                weight[2, p], weight[3, p] = south * west, south * east
                across = (left >= zero) & (left < fside), (left >= -one) & (left < last)
                down = (top >= zero) & (top < fside), (top >= -one) & (top < last)
                at = top * fside + left
                where[0, p] = np.uint32(at if across[0] & down[0] else fpixels)
                where[1, p] = np.uint32(at + one if across[1] & down[0] else fpixels)
                where[2, p] = np.uint32(at + fside if across[0] & down[1] else fpixels)
                where[3, p] = np.uint32(at + fside + one if across[1] & down[1] else fpixels)
            for p in range(pixels):  # the gathers
                nw, ne = framed[where[0, p]], framed[where[1, p]]
                sw, se = framed[where[2, p]], framed[where[3, p]]
                wnw, wne, wsw, wse = weight[0, p], weight[1, p], weight[2, p], weight[3, p]
                inw, ine = one if where[0, p] < pixels else zero, one if where[1, p] < pixels else zero
                isw, ise = one if where[2, p] < pixels else zero, one if where[3, p] < pixels else zero
                if fused:
                    image = fma(se, wse, fma(sw, wsw, fma(ne, wne, nw * wnw)))
                    mask = fma(ise, wse, fma(isw, wsw, fma(ine, wne, inw * wnw)))
                else:
                    image = ((nw * wnw + ne * wne) + sw * wsw) + se * wse
                    mask = ((inw * wnw + ine * wne) + isw * wsw) + ise * wse
                value[p] = np.rint((image - fill) * mask + fill)  # the fill where the mask is 0
        for p in range(pixels):  # normalised, vectorised
            row[p] = normalise(value[p], unit, mean, std, reciprocal)


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
