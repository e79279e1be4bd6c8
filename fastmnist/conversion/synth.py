"""Generate MNIST-format raw files of deterministic, digit-like images (for offline use).

The digits are seven-segment glyphs drawn with anti-aliased strokes at a few slants and
thicknesses, shifted by a few pixels and scaled in brightness: learnable, but not MNIST.
A marker file in the raw folder makes every set converted from them say ``synthetic``.
"""

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import FastMNISTError
from ..formats.datasets import COMPRESSIONS, SYNTHETIC_MARKER, get_spec
from ..formats.idx import IMAGE_SIDE, IMAGES, IdxWriter, label_kind

# Segment end points in a unit box (x right, y down): top, upper left/right, middle,
# lower left/right, bottom.
_SEGMENTS = {
    "t": ((0, 0), (1, 0)),
    "ul": ((0, 0), (0, 0.5)),
    "ur": ((1, 0), (1, 0.5)),
    "m": ((0, 0.5), (1, 0.5)),
    "ll": ((0, 0.5), (0, 1)),
    "lr": ((1, 0.5), (1, 1)),
    "b": ((0, 1), (1, 1)),
}
_DIGITS = [
    "t ul ur ll lr b",
    "ur lr",
    "t ur m ll b",
    "t ur m lr b",
    "ul ur m lr",
    "t ul m lr b",
    "t ul m ll lr b",
    "t ur lr",
    "t ul ur m ll lr b",
    "t ul ur m lr b",
]
_SLANTS = (-0.3, -0.15, 0.0, 0.15, 0.3)
_THICKNESS = (1.0, 1.5, 2.0)
_PAD = 4  # templates are drawn on a padded canvas, then cropped at a random shift


def _templates() -> np.ndarray:
    """Glyphs as float32 ``(10, len(_SLANTS), len(_THICKNESS), 36, 36)`` in [0, 1]."""
    side = IMAGE_SIDE + 2 * _PAD
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    out = np.zeros((10, len(_SLANTS), len(_THICKNESS), side, side), np.float32)
    for d, names in enumerate(_DIGITS):
        for s, slant in enumerate(_SLANTS):
            dist = np.full((side, side), np.inf, np.float32)
            for name in names.split():
                # unit box -> pixels: 10 wide, 18 tall, centred; slant shears x by height
                p0, p1 = (np.array([side / 2 - 5 + 10 * x + slant * 18 * (0.5 - y), side / 2 - 9 + 18 * y])
                          for x, y in _SEGMENTS[name])
                seg = p1 - p0
                t = ((xx - p0[0]) * seg[0] + (yy - p0[1]) * seg[1]) / float(seg @ seg)
                t = np.clip(t, 0.0, 1.0)
                d2 = np.hypot(xx - p0[0] - t * seg[0], yy - p0[1] - t * seg[1])
                dist = np.minimum(dist, d2)
            for k, thick in enumerate(_THICKNESS):
                out[d, s, k] = np.clip(thick + 0.5 - dist, 0.0, 1.0)
    return out


def _crops() -> np.ndarray:
    """uint8 ``(10, len(_SLANTS), len(_THICKNESS), 2 * _PAD + 1, 2 * _PAD + 1, 28, 28)``: every
    glyph at every shift, at full brightness."""
    t = _templates()
    shifts = 2 * _PAD + 1
    out = np.empty((*t.shape[:3], shifts, shifts, IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    for dy in range(shifts):
        for dx in range(shifts):
            out[:, :, :, dy, dx] = np.rint(t[..., dy:dy + IMAGE_SIDE, dx:dx + IMAGE_SIDE] * 255)
    return out


def generate(n: int, seed: int, num_classes: int = 10, chunk: int = 1 << 14
             ) -> tuple[np.ndarray, Iterator[np.ndarray]]:
    """Labels uint8 ``(n,)`` in ``0..num_classes - 1`` and an iterator of their images, uint8
    ``(r, 28, 28)`` chunks of up to ``chunk`` (each glyph the label's last digit): a pure
    function of the arguments, about a second per million images."""
    rng = np.random.default_rng(seed)
    crops = _crops()
    flat = crops.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    labels = rng.integers(0, num_classes, n, dtype=np.uint8)
    # one index into the crops per image: glyph, slant, thickness, vertical and horizontal shift
    glyph = np.ravel_multi_index((labels % 10, *(rng.integers(0, k, n) for k in crops.shape[1:5])),
                                 crops.shape[:5])
    gain = rng.integers(179, 256, n, dtype=np.uint16)  # brightness 0.7 .. 1.0, in 255ths

    def images():
        x = np.empty((chunk, IMAGE_SIDE, IMAGE_SIDE), np.uint16)
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            np.copyto(x[:b], np.take(flat, glyph[start:start + b], axis=0))
            x[:b] *= gain[start:start + b, None, None]  # at most 255 * 255
            x[:b] += 128
            x[:b] += x[:b] >> 8
            x[:b] >>= 8  # = round(pixel * gain / 255), exactly, for every uint16 product
            yield x[:b].astype(np.uint8)

    return labels, images()


def qmnist_columns(classes: np.ndarray, seed: int) -> np.ndarray:
    """int32 ``(n, 8)`` labels in QMNIST's layout: the class, then made-up writer metadata
    (HSF series, writer, digit index, NIST class code, global index, duplicate flag, 0)."""
    rng = np.random.default_rng(seed)
    n = len(classes)
    return np.stack([classes, rng.integers(0, 8, n), rng.integers(0, 4000, n), rng.integers(0, 150, n),
                     classes + 0x30, np.arange(n), np.zeros(n), np.zeros(n)], 1).astype(np.int32)


def write_raw(root: Path, n_train: int = 60000, n_test: int = 10000, dataset: str = "mnist",
              seed: int = 0, compressed: bool = True, force: bool = False) -> list[Path]:
    """Write the train and test raw files of ``dataset`` in torchvision's layout after a
    download, ``root/<Folder>/raw``: extracted, and (if ``compressed``) compressed too where
    torchvision keeps the compressed download (MNIST, QMNIST); returns the paths written.
    Raw files already there that an earlier run did not generate (real data, most likely)
    are replaced only with ``force``; otherwise nothing is written."""
    spec = get_spec(dataset)
    raw = Path(root) / spec.folder / "raw"
    if not force and not (raw / SYNTHETIC_MARKER).exists():
        stems = [f for split in spec.splits.values() for f in (split.images, split.labels)]
        for existing in sorted(p for stem in stems for c in COMPRESSIONS if (p := raw / (stem + c)).exists()):
            raise FastMNISTError(f"{existing}: raw {spec.name} file already there (real data?); generated "
                                 "digits would replace it: write them under another --root, or pass "
                                 "--force to replace it")
    raw.mkdir(parents=True, exist_ok=True)
    written = []
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
        files = spec.splits[split]
        labels, images = generate(n, split_seed, spec.num_classes)
        label_rows = qmnist_columns(labels, split_seed) if spec.label_columns else labels
        for stem, kind, chunks in ((files.images, IMAGES, images),
                                   (files.labels, label_kind(spec.label_columns), [label_rows])):
            paths = [raw / (stem + c) for c in COMPRESSIONS if c == "" or compressed and stem + c in spec.md5]
            with contextlib.ExitStack() as stack:
                writers = [stack.enter_context(IdxWriter(p, kind, n)) for p in paths]
                for chunk in chunks:
                    for w in writers:
                        w.write(chunk)
            written += paths
    marker = raw / SYNTHETIC_MARKER
    marker.write_text(json.dumps({"generator": "fastmnist.conversion.synth", "dataset": spec.name,
                                  "seed": seed, "train": n_train, "test": n_test}) + "\n")
    return written + [marker]
