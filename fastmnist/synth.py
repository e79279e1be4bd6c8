"""Generate MNIST-format raw files of deterministic, digit-like images (for offline use).

The digits are seven-segment glyphs drawn with anti-aliased strokes at a few slants and
thicknesses, shifted by a few pixels and scaled in brightness: learnable, but not MNIST.
A marker file in the raw folder makes every set converted from them say ``synthetic``.
"""

import json
from pathlib import Path

import numpy as np

from .datasets import get_spec
from .idx import IMAGE_SIDE, write_idx

SYNTHETIC_MARKER = "fastmnist-synthetic.json"

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


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images uint8 ``(n, 28, 28)`` and labels uint8 ``(n,)``, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    templates = _templates()
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    slant = rng.integers(0, len(_SLANTS), n)
    thick = rng.integers(0, len(_THICKNESS), n)
    dy, dx = rng.integers(0, 2 * _PAD + 1, (2, n))
    gain = rng.uniform(0.7, 1.0, n).astype(np.float32)
    images = np.empty((n, IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    rows = np.arange(IMAGE_SIDE)
    for start in range(0, n, 8192):
        sl = slice(start, min(start + 8192, n))
        glyph = templates[labels[sl], slant[sl], thick[sl]]  # (b, 36, 36)
        ri = (dy[sl, None] + rows)[:, :, None]
        ci = (dx[sl, None] + rows)[:, None, :]
        crop = glyph[np.arange(len(glyph))[:, None, None], ri, ci]
        images[sl] = np.rint(crop * gain[sl, None, None] * 255).astype(np.uint8)
    return images, labels


def write_raw(root: Path, n_train: int = 60000, n_test: int = 10000, dataset: str = "mnist",
              seed: int = 0) -> list[Path]:
    """Write IDX files in torchvision's layout after a download, ``root/<Folder>/raw``, each as
    ``.gz`` and extracted; returns the paths written."""
    spec = get_spec(dataset)
    raw = Path(root) / spec.folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    written = []
    for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = generate(n, split_seed)
        for kind, array in (("images", images), ("labels", labels)):
            for name in (spec.stem(split, kind), spec.stem(split, kind) + ".gz"):
                written.append(write_idx(raw / name, array))
    marker = raw / SYNTHETIC_MARKER
    marker.write_text(json.dumps({"generator": "fastmnist.synth", "seed": seed,
                                  "train": n_train, "test": n_test}) + "\n")
    return written + [marker]
