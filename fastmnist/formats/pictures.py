"""Images from other tools, made MNIST-shaped: encoded files (PNG, JPEG, PGM, ...) decoded in
parallel processes, and arrays checked, each to uint8 ``(N, 28, 28)``.

Anything that is not 28x28 with one channel is refused, naming where it came from and its
shape, unless the caller asks for ``grayscale`` (Pillow's ``convert("L")``, ITU-R 601-2
luma) and/or ``resize`` (Pillow's bilinear resize to 28x28, which filters when shrinking).
Pillow is needed only for decoding and for those conversions.
"""

import io
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat

import numpy as np

from ..errors import FastMNISTError
from .idx import IMAGE_SIDE

SINGLE_CHANNEL = ("L", "1")  # Pillow modes taken as they are ("1": bilevel, read as 0/255)
CONVERSIONS = {"grayscale": "Pillow convert('L'): ITU-R 601-2 luma",
               "resize": "Pillow resize to 28x28, bilinear"}  # as recorded in the manifest
_DECODE_CHUNK = 2048  # images per task: 0.2 s of decoding, against a few ms to send and return
PARALLEL_FROM = 20000  # images: below, starting the processes (~0.5 s) costs more than they save


def pillow():
    """The ``PIL.Image`` module, or an error saying which extra installs it."""
    try:
        from PIL import Image
    except ImportError:
        raise FastMNISTError("decoding images needs Pillow: pip install 'fastmnist[formats]'") from None
    return Image


def decode(blobs: Sequence[bytes], where: str, name: Callable[[int], str], grayscale: bool = False,
           resize: bool = False, progress=None, workers: int | None = None) -> np.ndarray:
    """uint8 ``(len(blobs), 28, 28)`` from encoded images. Pillow spends most of its ~90 us
    per MNIST PNG in Python, so threads do not help: ``workers`` processes do (default: one
    per core once there are ``PARALLEL_FROM`` images). A blob that does not decode, or does
    not conform, raises naming ``where`` (if not empty) and ``name(i)``. ``progress``: a
    tqdm-like bar, updated per chunk."""
    pillow()
    workers = workers or (os.cpu_count() or 1 if len(blobs) >= PARALLEL_FROM else 1)
    starts = range(0, len(blobs), _DECODE_CHUNK)
    chunks = (blobs[lo:lo + _DECODE_CHUNK] for lo in starts)
    out = np.empty((len(blobs), IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    pool = ProcessPoolExecutor(workers, mp_context=_start_method()) if workers > 1 else None
    try:
        done = pool.map(_decode_chunk, chunks, repeat(grayscale), repeat(resize)) if pool else \
            map(_decode_chunk, chunks, repeat(grayscale), repeat(resize))
        for lo, (images, failure) in zip(starts, done, strict=True):
            if failure is not None:
                at, problem = failure
                raise FastMNISTError(f"{where}: {name(lo + at)}: {problem}" if where else
                                     f"{name(lo + at)}: {problem}")
            out[lo:lo + len(images)] = images
            if progress is not None:
                progress.update(len(images))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def _start_method():
    """Fork where there is one: unlike spawn and forkserver, it does not re-run the caller's
    ``__main__``, so a script that converts at top level (no ``if __name__ ...`` guard)
    works. The children only decode with Pillow and numpy."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _decode_chunk(blobs: Sequence[bytes], grayscale: bool, resize: bool):
    """uint8 ``(len(blobs), 28, 28)`` and None, or, at the first blob that fails, the images
    so far and ``(its index, the problem)``."""
    image = pillow()
    out = np.empty((len(blobs), IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    for i, blob in enumerate(blobs):
        try:
            with image.open(io.BytesIO(blob)) as im:
                im.load()
                out[i] = _conformed(im, grayscale, resize)
        except _Unfit as e:
            return out[:i], (i, str(e))
        except Exception as e:  # Pillow raises many kinds for a damaged file
            return out[:i], (i, f"not a readable image ({type(e).__name__}: {e})")
    return out, None


class _Unfit(ValueError):
    """An image that decoded but is not 28x28 with one channel (and was not to be converted)."""


def conform(im, where: str, grayscale: bool, resize: bool) -> np.ndarray:
    """A decoded Pillow image as uint8 ``(28, 28)``, converted only as asked; ``where``
    names it in the error."""
    try:
        return _conformed(im, grayscale, resize)
    except _Unfit as e:
        raise FastMNISTError(f"{where}: {e}") from None


def _conformed(im, grayscale: bool, resize: bool) -> np.ndarray:
    if im.mode.startswith(("I", "F")):  # 16/32-bit or float: Pillow's convert("L") clips at 255
        raise _Unfit(f"a {im.mode} image (more than 8 bits a pixel), expected 8-bit; scale it to 0..255 "
                     "yourself (a 16-bit array: (a // 257).astype(np.uint8)) and convert that "
                     "(fastmnist.convert_arrays); --grayscale would clip every pixel above 255")
    if im.mode not in SINGLE_CHANNEL:
        if not grayscale:
            raise _Unfit(f"a {im.mode} image ({len(im.getbands())} channels), expected one channel; "
                         "--grayscale (grayscale=True) converts it")
        im = im.convert("L")
    if im.size != (IMAGE_SIDE, IMAGE_SIDE):
        if not resize:
            raise _Unfit(f"{im.size[0]}x{im.size[1]} pixels, expected 28x28; --resize (resize=True) "
                         "scales it")
        im = im.resize((IMAGE_SIDE, IMAGE_SIDE), pillow().Resampling.BILINEAR)
    return np.asarray(im.convert("L") if im.mode == "1" else im, np.uint8)


def conform_array(images, where: str, grayscale: bool = False, resize: bool = False) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` from an array of images: ``(N, 28, 28)``, ``(N, 1, 28, 28)`` or
    ``(N, 28, 28, 1)`` as they are; ``(N, H, W)`` or ``(N, H, W, 3|4)`` (channels last) through
    the conversions asked for, image by image."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise FastMNISTError(f"{where}: images of dtype {images.dtype}, expected uint8 (0..255); "
                             "scale and round them first, e.g. (x * 255).round().astype(np.uint8)")
    square = (IMAGE_SIDE, IMAGE_SIDE)
    if images.ndim == 4 and images.shape[1] == 1 and images.shape[2:] == square:
        return images[:, 0]
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.ndim == 3 and images.shape[1:] == square:
        return images
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (3, 4)):
        raise FastMNISTError(f"{where}: images of shape {images.shape}, expected (N, 28, 28) with one "
                             "channel, or (N, H, W, 3|4) channels last")
    if (images.ndim == 4 and not grayscale) or (images.shape[1:3] != square and not resize):
        shown = "x".join(map(str, images.shape[1:]))
        raise FastMNISTError(f"{where}: images of shape {shown}, expected 28x28 with one channel; "
                             "--grayscale and --resize (grayscale=True, resize=True) convert them")
    image = pillow()
    return np.stack([conform(image.fromarray(im), f"{where}: image {i}", grayscale, resize)
                     for i, im in enumerate(images)]) if len(images) else \
        np.empty((0, *square), np.uint8)
