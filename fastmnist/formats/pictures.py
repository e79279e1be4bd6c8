"""Images from other tools, made MNIST-shaped: encoded files (PNG, JPEG, PGM, ...) decoded in
parallel, and arrays checked, each to uint8 ``(N, 28, 28)``.

Anything that is not 28x28 with one channel is refused, naming where it came from and its
shape, unless the caller asks for ``grayscale`` (Pillow's ``convert("L")``, ITU-R 601-2
luma) and/or ``resize`` (Pillow's bilinear resize to 28x28, which filters when shrinking).
Pillow is needed only for decoding and for those conversions.
"""

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import FastMNISTError
from .idx import IMAGE_SIDE

SINGLE_CHANNEL = ("L", "1")  # Pillow modes taken as they are ("1": bilevel, read as 0/255)
CONVERSIONS = {"grayscale": "Pillow convert('L'): ITU-R 601-2 luma",
               "resize": "Pillow resize to 28x28, bilinear"}  # as recorded in the manifest
_DECODE_CHUNK = 512  # images per task: big enough to amortise, small enough to balance 2-16 threads


def pillow():
    """The ``PIL.Image`` module, or an error saying which extra installs it."""
    try:
        from PIL import Image
    except ImportError:
        raise FastMNISTError("decoding images needs Pillow: pip install 'fastmnist[formats]'") from None
    return Image


def decode(blobs: Sequence[bytes], where: str, name: Callable[[int], str], grayscale: bool = False,
           resize: bool = False, progress=None, threads: int | None = None) -> np.ndarray:
    """uint8 ``(len(blobs), 28, 28)`` from encoded images, decoded on ``threads`` (default:
    all cores; Pillow lets go of the GIL while it decodes). A blob that does not decode, or does not conform,
    raises naming ``where`` (if not empty) and ``name(i)``. ``progress``: a tqdm-like bar,
    updated per chunk."""
    image = pillow()
    out = np.empty((len(blobs), IMAGE_SIDE, IMAGE_SIDE), np.uint8)

    def work(lo: int) -> int:
        for i in range(lo, min(lo + _DECODE_CHUNK, len(blobs))):
            shown = f"{where}: {name(i)}" if where else name(i)
            try:
                with image.open(io.BytesIO(blobs[i])) as im:
                    im.load()
                    out[i] = conform(im, shown, grayscale, resize)
            except FastMNISTError:
                raise
            except Exception as e:  # Pillow raises many kinds for a damaged file
                raise FastMNISTError(f"{shown}: not a readable image "
                                     f"({type(e).__name__}: {e})") from None
        return min(_DECODE_CHUNK, len(blobs) - lo)

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for n in pool.map(work, range(0, len(blobs), _DECODE_CHUNK)):
            if progress is not None:
                progress.update(n)
    return out


def conform(im, where: str, grayscale: bool, resize: bool) -> np.ndarray:
    """A decoded Pillow image as uint8 ``(28, 28)``, converted only as asked."""
    if im.mode not in SINGLE_CHANNEL:
        if not grayscale:
            raise FastMNISTError(f"{where}: a {im.mode} image ({len(im.getbands())} channels), expected "
                                 "one channel; --grayscale (grayscale=True) converts it")
        im = im.convert("L")
    if im.size != (IMAGE_SIDE, IMAGE_SIDE):
        if not resize:
            raise FastMNISTError(f"{where}: {im.size[0]}x{im.size[1]} pixels, expected 28x28; "
                                 "--resize (resize=True) scales it")
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
