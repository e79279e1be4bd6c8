"""The numba kernels behind ``kernels.py`` (imported by it on first use; see there for the
arguments). Each helper is inlined into the kernels, so a kernel is one compiled loop nest."""

import functools

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

from ..formats.idx import IMAGE_SIDE as SIDE
from . import augment
from .kernels import AFFINE, BILINEAR_FMA, NEAREST

jit = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")  # IEEE division
inline = numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", inline="always")


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
def four_at(typingctx, array, offset):
    """Elements ``offset`` to ``offset + 3`` of the C-contiguous uint8 ``array`` (counted over
    all of it) as one uint32: one load of 4 bytes, at any alignment."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        word = ir.IntType(32)
        return builder.load(builder.bitcast(builder.gep(data, [args[1]]), word.as_pointer()), align=1)
    return numba.types.uint32(array, offset), codegen


@intrinsic
def copy_row(typingctx, target, at, source, start):
    """``target[at:at + 28] = source[start:start + 28]`` (uint8, C-contiguous, counted over
    all of each; not overlapping): one copy of 28 bytes, which a loop's index arithmetic
    slows six times."""
    def codegen(context, builder, signature, args):
        to = context.make_array(signature.args[0])(context, builder, args[0]).data
        come = context.make_array(signature.args[2])(context, builder, args[2]).data
        cgutils.raw_memcpy(builder, builder.gep(to, [args[1]]), builder.gep(come, [args[3]]),
                           ir.Constant(ir.IntType(64), SIDE), 1, align=1)
        return context.get_dummy_value()
    return numba.types.void(target, at, source, start), codegen


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


@inline
def scratch():
    """A kernel's per-sample buffers: the grid (x, y: float32 (784,) each); for nearest, the
    source framed (float32 (785,): the sample's pixels, then what lies outside) and each output
    pixel's source pixel (uint32 (784,), 784 meaning outside); for bilinear, the source in a
    border of zeros (uint8 ``BORDERED``, the rows past it zero too) and its rows paired
    (``paired``), each output pixel's neighbours (uint32 (784,): the north-west one's place in
    the frame), their weights and whether each is inside (float32 (4, 784) each), and their
    values (uint32 (784,), a byte each)."""
    pixels = SIDE * SIDE
    return (np.empty(pixels, np.float32), np.empty(pixels, np.float32), np.empty(pixels + 1, np.float32),
            np.empty(pixels, np.uint32), np.zeros(BORDERED, np.uint8),
            np.zeros(2 * (BORDERED - WIDE), np.uint8), np.empty((4, pixels), np.float32),
            np.empty((4, pixels), np.float32), np.empty(pixels, np.uint32))


@inline
def nearest_at(gx, gy):
    """grid_sample's nearest source pixel of the grid point (gx, gy) (unnormalised, rounded
    half to even), uint32, or 784 outside (NaN and infinite points included)."""
    one, half_side, half = np.float32(1.0), np.float32(SIDE / 2), np.float32(0.5)
    zero, fside, fpixels = np.float32(0.0), np.float32(SIDE), np.float32(SIDE * SIDE)
    ix = np.rint((gx + one) * half_side - half)
    iy = np.rint((gy + one) * half_side - half)
    inside = (ix >= zero) & (ix < fside) & (iy >= zero) & (iy < fside)  # NaN: outside
    return np.uint32(iy * fside + ix if inside else fpixels)


WIDE = SIDE + 2  # a row of the source in a border of zeros (bilinear)
BORDERED = WIDE * (WIDE + 2)  # that frame, and two rows of zeros past it: where the neighbours outside are


@inline
def bilinear_where(gx, gy, fused, at, weight, inside):
    """grid_sample's four bilinear neighbours of grid point p (nw, ne, sw, se), as torch's CPU
    kernel rounds them (``fused``: its AVX2/AVX-512 build, which unnormalises with a fused
    multiply-add): their weights weight[c, p], whether each is inside the image (inside[c, p]:
    1 or 0) and at[p], where the north-west one lies in the source framed by a border of zeros
    (``BORDERED``; ne follows it, sw and se a row below), or the zero rows past the frame where
    no neighbour is inside or at its border."""
    one, zero, half_side, half = np.float32(1.0), np.float32(0.0), np.float32(SIDE / 2), np.float32(0.5)
    fside, last, wide = np.float32(SIDE), np.float32(SIDE - 1), np.float32(WIDE)
    for p in range(SIDE * SIDE):  # vectorised: positions, weights, neighbours
        if fused:
            x, y = fma(gx[p] + one, half_side, -half), fma(gy[p] + one, half_side, -half)
        else:
            x, y = (gx[p] + one) * half_side - half, (gy[p] + one) * half_side - half
        left, top = np.floor(x), np.floor(y)
        east, south = x - left, y - top
        west, north = one - east, one - south
        weight[0, p], weight[1, p] = north * west, north * east
        weight[2, p], weight[3, p] = south * west, south * east
        across = (left >= zero) & (left < fside), (left >= -one) & (left < last)
        down = (top >= zero) & (top < fside), (top >= -one) & (top < last)
        inside[0, p] = one if across[0] & down[0] else zero
        inside[1, p] = one if across[1] & down[0] else zero
        inside[2, p] = one if across[0] & down[1] else zero
        inside[3, p] = one if across[1] & down[1] else zero
        framed = (left >= -one) & (left < fside) & (top >= -one) & (top < fside)
        at[p] = np.uint32((top + one) * wide + left + one if framed else wide * wide)


@inline
def gather(source, framed, where, fill, norm, reciprocal, row):
    """row[p]: the uint8 ``source`` (784,) pixel where[p] (``fill`` at 784) normalised."""
    pixels = SIDE * SIDE
    unit, mean, std = norm[0], norm[1], norm[2]  # scalars: stores into framed cannot change them
    normalise_into(source, framed, 0, unit, mean, std, reciprocal)
    framed[pixels] = normalise(fill, unit, mean, std, reciprocal)
    for p in range(pixels):
        row[p] = framed[where[p]]


@inline
def paired(bordered, pairs):
    """pairs[2k], pairs[2k + 1] = bordered[k], the pixel below it: a pixel's four bilinear
    neighbours in four bytes in a row (nw, sw, ne, se)."""
    for k in range(BORDERED - WIDE):
        pairs[2 * k], pairs[2 * k + 1] = bordered[k], bordered[k + WIDE]


@inline
def blend(source, bordered, pairs, at, weight, inside, near, fill, fused, norm, reciprocal, row):
    """row[p]: the bilinear sum of ``source``'s four neighbours of p (``bilinear_where``'s
    ``at``; 0 outside) weighted by weight[:, p], with torchvision's fill (the sum of the
    weights inside as its mask), rounded to the uint8 it becomes (NaN, of a NaN or infinite
    grid point: 0, as torch converts it) and normalised."""
    pixels = SIDE * SIDE
    zero = np.float32(0.0)
    unit, mean, std = norm[0], norm[1], norm[2]
    for i in range(SIDE):  # the border stays 0
        copy_row(bordered, (i + 1) * WIDE + 1, source, i * SIDE)
    paired(bordered, pairs)
    for p in range(pixels):  # the gathers alone, four neighbours a load, so that what follows vectorises
        near[p] = four_at(pairs, 2 * at[p])
    values = near.view(np.uint8)  # nw, sw, ne, se of each pixel
    for p in range(pixels):
        nw, sw = np.float32(values[4 * p]), np.float32(values[4 * p + 1])
        ne, se = np.float32(values[4 * p + 2]), np.float32(values[4 * p + 3])
        wnw, wne, wsw, wse = weight[0, p], weight[1, p], weight[2, p], weight[3, p]
        inw, ine, isw, ise = inside[0, p], inside[1, p], inside[2, p], inside[3, p]
        if fused:
            image = fma(se, wse, fma(sw, wsw, fma(ne, wne, nw * wnw)))
            mask = fma(ise, wse, fma(isw, wsw, fma(ine, wne, inw * wnw)))
        else:
            image = ((nw * wnw + ne * wne) + sw * wsw) + se * wse
            mask = ((inw * wnw + ine * wne) + isw * wsw) + ise * wse
        value = np.rint((image - fill) * mask + fill)  # the fill where the mask is 0
        row[p] = normalise(value if value == value else zero, unit, mean, std, reciprocal)


@inline
def resample(source, gx, gy, fill, mode, norm, reciprocal, buffers, row):
    """row: the uint8 ``source`` (784,) resampled at the grid ``gx``, ``gy`` (in [-1, 1]) as
    grid_sample's ``mode`` (``NEAREST``, ``BILINEAR`` or ``BILINEAR_FMA``) then torchvision
    compute it, ``fill`` outside (a whole number for nearest), normalised."""
    framed, where, bordered, pairs, weight, inside, near = buffers[2:]
    if mode == NEAREST:
        for p in range(SIDE * SIDE):  # one flat loop, which the compiler vectorises (rows of 28 it does not)
            where[p] = nearest_at(gx[p], gy[p])
        gather(source, framed, where, fill, norm, reciprocal, row)
    else:
        fused = mode == BILINEAR_FMA
        bilinear_where(gx, gy, fused, where, weight, inside)
        blend(source, bordered, pairs, where, weight, inside, near, fill, fused, norm, reciprocal, row)


@functools.cache
def affine_for(mode):
    """The affine kernel for resampling ``mode`` (a constant in it: only its branch is
    compiled)."""
    @jit
    def affine(images, rows, indices, key, config, base, fill, norm, reciprocal, out):
        pixels = SIDE * SIDE
        flat, flat_out = images.reshape(images.shape[0], pixels), out.reshape(out.shape[0], pixels)
        buffers = scratch()
        gx, gy, where = buffers[0], buffers[1], buffers[3]
        xs, ys = base_grid(base)
        for b in range(out.shape[0]):
            fetch_ahead(flat, rows, b + AHEAD)
            (s00, s10, s20, s01, s11, s21), quarter = matrix(config, mix(key ^ np.uint64(indices[b])))
            if quarter >= 0 or mode == NEAREST:
                if quarter >= 0:
                    quarter_turn(where, quarter)
                else:  # the grid's points rounded as they are computed: one pass (0.61 -> 0.46 us a sample)
                    for p in range(pixels):
                        x, y = (xs[p] * s00 + ys[p] * s10) + s20, (xs[p] * s01 + ys[p] * s11) + s21
                        where[p] = nearest_at(x, y)
                gather(flat[rows[b]], buffers[2], where, fill, norm, reciprocal, flat_out[b])
                continue
            for p in range(pixels):  # torchvision's affine grid, with _affine_grid's float32 roundings
                gx[p] = (xs[p] * s00 + ys[p] * s10) + s20
                gy[p] = (xs[p] * s01 + ys[p] * s11) + s21
            resample(flat[rows[b]], gx, gy, fill, mode, norm, reciprocal, buffers, flat_out[b])
    return affine


@functools.cache
def perspective_for(mode):
    """The perspective kernel for resampling ``mode`` (a constant in it: only its branch is
    compiled)."""
    @jit
    def perspective(images, rows, coefficients, applied, base, fill, norm, reciprocal, out):
        pixels = SIDE * SIDE
        one, half_side = np.float32(1.0), np.float32(SIDE / 2)
        flat, flat_out = images.reshape(images.shape[0], pixels), out.reshape(out.shape[0], pixels)
        buffers = scratch()
        gx, gy = buffers[0], buffers[1]
        xs, ys = base_grid(base)
        for b in range(out.shape[0]):
            fetch_ahead(flat, rows, b + AHEAD)
            if not applied[b]:
                normalise_into(flat[rows[b]], flat_out[b], 0, norm[0], norm[1], norm[2], reciprocal)
                continue
            c = coefficients[b]
            ax, bx, cx = c[0] / half_side, c[1] / half_side, c[2] / half_side
            ay, by, cy = c[3] / half_side, c[4] / half_side, c[5] / half_side
            for p in range(pixels):  # torchvision's _perspective_grid, its float32 roundings
                below = (xs[p] * c[6] + ys[p] * c[7]) + one
                gx[p] = ((xs[p] * ax + ys[p] * bx) + cx) / below - one
                gy[p] = ((xs[p] * ay + ys[p] * by) + cy) / below - one
            resample(flat[rows[b]], gx, gy, fill, mode, norm, reciprocal, buffers, flat_out[b])
    return perspective


@inline
def blur_pass(lines, w, size, padded, out):
    """out[q] = sum over k of w[k] * lines[q + (k - size // 2) * 28], in that order, from 0
    (``augment._blur``'s products and sums): the float32 ``lines`` (784,) blurred across its 28
    lines of 28, reflect-padded; ``padded``: float32 scratch of at least (28 + size) * 28."""
    half = size // 2
    for at in range(SIDE + 2 * half):
        source = abs(at - half)
        source = source if source < SIDE else 2 * (SIDE - 1) - source
        for q in range(SIDE):
            padded[at * SIDE + q] = lines[source * SIDE + q]
    for q in range(SIDE * SIDE):
        out[q] = np.float32(0.0)
    k = 0
    while k + 4 <= size:  # four taps a pass over out (the same sums in the same order), vectorised
        w0, w1, w2, w3 = w[k], w[k + 1], w[k + 2], w[k + 3]
        at = k * SIDE
        for q in range(SIDE * SIDE):
            total = out[q] + w0 * padded[at + q]
            total = total + w1 * padded[at + SIDE + q]
            total = total + w2 * padded[at + 2 * SIDE + q]
            out[q] = total + w3 * padded[at + 3 * SIDE + q]
        k += 4
    for tap in range(k, size):
        at = tap * SIDE
        for q in range(SIDE * SIDE):
            out[q] = out[q] + w[tap] * padded[at + q]


@inline
def transpose(source, target):
    for i in range(SIDE):
        for j in range(SIDE):
            target[i * SIDE + j] = source[j * SIDE + i]


@functools.cache
def elastic_for(mode):
    """The elastic kernel for resampling ``mode`` (a constant in it: only its branch is
    compiled)."""
    @jit
    def elastic(images, rows, indices, key, weights, sizes, alpha, side, fill, norm, reciprocal, out):
        pixels = SIDE * SIDE
        one, two, fside = np.float32(1.0), np.float32(2.0), np.float32(SIDE)
        flat, flat_out = images.reshape(images.shape[0], pixels), out.reshape(out.shape[0], pixels)
        buffers = scratch()
        grid, identity = (buffers[0], buffers[1]), base_grid(side)
        most = SIDE * (SIDE + max(sizes[0], sizes[1]))
        noise, field, line, padded = (np.empty(pixels, np.float32), np.empty(pixels, np.float32),
                                      np.empty(most, np.float32), np.empty(most, np.float32))
        for b in range(out.shape[0]):
            sample = mix(key ^ np.uint64(indices[b]))
            for axis in range(2):  # augment._Elastic.params: noise, blurred, scaled; then the grid
                for j in range(SIDE):  # transposed: noise[j * 28 + i] is pixel (i, j)'s
                    for i in range(SIDE):  # vectorised (a flat loop's index arithmetic is not)
                        u = np.float32(draw(sample, axis * pixels + i * SIDE + j))
                        noise[j * SIDE + i] = u * two - one
                if sizes[axis]:  # along x on the columns, then along y on the rows
                    blur_pass(noise, weights[axis, 0], sizes[axis], padded, line)
                    transpose(line, noise)
                    blur_pass(noise, weights[axis, 1], sizes[axis], padded, field)
                else:
                    transpose(noise, field)
                g, base, scale = grid[axis], identity[axis], alpha[axis]
                for p in range(pixels):
                    g[p] = field[p] * scale / fside + base[p]
            resample(flat[rows[b]], grid[0], grid[1], fill, mode, norm, reciprocal, buffers, flat_out[b])
    return elastic


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


MARGIN = 64  # gels' error bound, in multiples of the backward error of one rounding (see below)


@inline
def homography(ends, cross, scale, inverse, h):
    """h int64 (9,): a multiple of the homography mapping the end points ``ends`` int64 (4, 2)
    to ``augment.START``, row by row, exact (every product under 2^53): the projective frame
    of the ends inverted (adjugates of cross products) and followed by the start's. ``cross``,
    ``inverse``: int64 (3, 3) scratch, ``scale`` int64 (3,)."""
    for row in range(3):  # rows: p1 x p2, p2 x p0, p0 x p1, with p = (x, y, 1)
        i, j = (row + 1) % 3, (row + 2) % 3
        cross[row, 0], cross[row, 1] = ends[i, 1] - ends[j, 1], ends[j, 0] - ends[i, 0]
        cross[row, 2] = ends[i, 0] * ends[j, 1] - ends[j, 0] * ends[i, 1]
    for row in range(3):  # the ends' frame: p3 = sum of scale[i] * p[i] (times its determinant)
        scale[row] = cross[row, 0] * ends[3, 0] + cross[row, 1] * ends[3, 1] + cross[row, 2]
    for row in range(3):  # the frame's adjugate
        for column in range(3):
            inverse[row, column] = scale[(row + 1) % 3] * scale[(row + 2) % 3] * cross[row, column]
    last = SIDE - 1  # the start's frame: p0, -p1, p2 of its corners
    for column in range(3):
        h[column] = last * (inverse[2, column] - inverse[1, column])
        h[3 + column] = last * inverse[2, column]
        h[6 + column] = inverse[0, column] - inverse[1, column] + inverse[2, column]


@inline
def invert(a, work):
    """work[:, 8:] = a^-1 (float64 (8, 8); ``work`` float64 (8, 16)) by Gauss-Jordan
    elimination with partial pivoting; False where a pivot is 0."""
    for row in range(8):
        for c in range(8):
            work[row, c], work[row, 8 + c] = a[row, c], 1.0 if row == c else 0.0
    for column in range(8):
        pivot = column
        for row in range(column + 1, 8):
            if abs(work[row, column]) > abs(work[pivot, column]):
                pivot = row
        if work[pivot, column] == 0.0:
            return False
        if pivot != column:
            for c in range(16):
                work[column, c], work[pivot, c] = work[pivot, c], work[column, c]
        scale = 1.0 / work[column, column]
        for c in range(16):
            work[column, c] *= scale
        for row in range(8):
            if row != column:
                factor = work[row, column]
                for c in range(16):
                    work[row, c] -= factor * work[column, c]
    return True


@inline
def abs_sum(row):
    total = 0.0
    for v in row:
        total += abs(v)
    return total


@inline
def rounding_room(x, single, bits):
    """How far the float64 ``x`` (not 0) lies from the nearest value whose float32 rounding
    differs from its own: from the midpoints between its float32 and that float32's two
    neighbours (``single``: float32 (1,) scratch, ``bits`` its int32 view)."""
    f = single[0] = np.float32(x)
    bits[0] += 1  # one neighbour (away from 0), then the other
    one_side = (np.float64(f) + np.float64(single[0])) / 2
    bits[0] -= 2
    other_side = (np.float64(f) + np.float64(single[0])) / 2
    return min(abs(x - one_side), abs(x - other_side))


@jit
def perspective_coefficients(ends, systems, out, certified):
    """For each sample b's end points ``ends[b]`` (int64 (B, 4, 2)) and the system gels
    solves for them, ``systems[b]`` (float64 (8, 8), ``augment._perspective_system``):
    ``out[b]`` float32 (8,), torchvision's perspective coefficients (LAPACK gels' float64
    least-squares solution made float32), and ``certified[b]``: whether they are gels' for
    certain. They are the exact
    solution (integer arithmetic, one division) made float32, certain where no float32
    rounding boundary lies within gels' error of it: that error is at most sum over j of
    |A^-1[k, j]| |r_j|, r = A x - b its residual, bounded as QR's backward error bounds it
    (``MARGIN`` roundings of |A| |x| + |b|; on 400,000 random end points the error stayed
    under a third of one rounding's bound). Uncertain: singular or ill-conditioned systems,
    and coefficients exactly 0, which gels leaves a few roundings off 0."""
    u = 2.0 ** -53
    work, single = np.empty((8, 16)), np.empty(1, np.float32)
    inverse, bits = work[:, 8:], single.view(np.int32)
    cross, adjugate = np.empty((3, 3), np.int64), np.empty((3, 3), np.int64)
    scale, h, x = np.empty(3, np.int64), np.empty(9, np.int64), np.empty(8)
    for b in range(ends.shape[0]):
        homography(ends[b], cross, scale, adjugate, h)
        certified[b] = h[8] != 0
        if not certified[b]:
            continue
        for k in range(8):
            x[k] = np.float64(h[k]) / np.float64(h[8])
        a = systems[b]
        if not invert(a, work):
            certified[b] = False
            continue
        size, largest, worst = 0.0, 0.0, 0.0  # |A|, |x| and |A^-1| (largest row sums)
        for row in range(8):
            size = max(size, abs_sum(a[row]))
            worst = max(worst, abs_sum(inverse[row]))
            largest = max(largest, abs(x[row]))
        if worst * size > 1e8:  # ill-conditioned: the inverse's own error matters
            certified[b] = False
            continue
        residual = MARGIN * u * (size * largest + (SIDE - 1.0))  # |b| = 27
        for k in range(8):
            f = out[b, k] = np.float32(x[k])
            error = abs_sum(inverse[k]) * residual + abs(x[k]) * 2 * u  # gels' and the division's
            if not (np.isfinite(f) and f != 0 and rounding_room(x[k], single, bits) > error):
                certified[b] = False
