"""Conversion from anything but torchvision's IDX files: the readers of ``formats/foreign.py``
(``convert_from``) or arrays in memory (``convert_arrays``), made uniform (images uint8 28x28,
labels int64 checked against the class count, an optional seeded ``val`` split) and written
by the converter's own writer, with the same checks, atomic swap, manifest and checksums.
"""

import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FastMNISTError
from ..formats.datasets import INPUT_KINDS
from ..formats.files import hash_file
from ..formats.foreign import READERS, SPLIT_WORD, InputPart, Samples, detect, walked
from ..formats.manifest import IMAGE_SHAPE, MAX_CLASSES, MAX_LABEL_COLUMNS, SPLIT_NAME, UNLABELLED
from ..formats.pictures import CONVERSIONS, conform_array
from .converter import CHUNK, ConvertResult, Output, build, convert, input_entry, progress_bar


def convert_arrays(images, labels, out, split: str = "train", mean=None, std=None, *, dataset: str = "arrays",
                   num_classes: int | None = None, grayscale: bool = False, resize: bool = False,
                   val_fraction: float | None = None, seed: int = 0, format: str = "npy",
                   shard_size: int = 10000, float32: bool = True, force: bool = False,
                   progress: bool = True) -> ConvertResult:
    """Convert images and labels already in memory into the set at ``out``.

    ``images``: uint8 ``(N, 28, 28)``, ``(N, 1, 28, 28)`` or ``(N, 28, 28, 1)`` (other sizes,
    and channels-last colour, with ``resize``/``grayscale``); ``labels``: integers ``(N,)``,
    or ``(N, K)`` for multi-label sets (stored ``[N, K]`` int64), or None for a split without
    labels (stored as ``UNLABELLED``, -1, and marked so in the manifest; ``.npy`` only). Both may instead be
    mappings ``{split: array}`` for several splits at once. ``num_classes``: default the
    largest label + 1. ``val_fraction``: hold out that fraction of ``train`` (a seeded, recorded
    draw) as a ``val`` split. Other arguments as for :func:`convert`.
    """
    start = time.perf_counter()
    if isinstance(images, Mapping) != isinstance(labels, Mapping) or (
            isinstance(images, Mapping) and set(images) != set(labels)):
        raise FastMNISTError("images and labels: give both as arrays, or both as {split: array} "
                             "with the same splits")
    pairs = images.items() if isinstance(images, Mapping) else [(split, images)]
    read = {name: Samples(im, labels[name] if isinstance(labels, Mapping) else labels,
                          f"{name} arrays", lambda i: f"index {i}") for name, im in pairs}
    fingerprint = {name: _array_fingerprint(s.images, s.labels) for name, s in read.items()}
    prepared = _prepare(read, num_classes, grayscale, resize, val_fraction, seed)
    options = _foreign_options("arrays", dataset, mean, std, format, shard_size, float32,
                               grayscale, resize, val_fraction, seed, None, None, num_classes, None)
    output = Output(Path(out), format, shard_size, float32, progress)
    return build(output, dataset, False, options, fingerprint, lambda: prepared, mean, std, None, force,
                  start)


def convert_from(source, out, kind: str | None = None, *, split: str | None = None,
                 image_key: str | None = None, label_key: str | None = None, dataset: str | None = None,
                 num_classes: int | None = None, grayscale: bool = False, resize: bool = False,
                 val_fraction: float | None = None, seed: int = 0, mean=None, std=None,
                 format: str = "npy", shard_size: int = 10000, float32: bool = True,
                 force: bool = False, progress: bool = True) -> ConvertResult:
    """Convert digits kept elsewhere into the set at ``out``: ``kind`` one of
    ``INPUT_KINDS`` (default: told from ``source``): "idx" (a torchvision root), "hf"
    (parquet or Arrow files or folders, or a ``datasets.Dataset``/``DatasetDict``), "npz",
    "csv", "images" (an ``ImageFolder`` tree) or "wds" (tar shards: files, a folder, a brace
    pattern or URLs). ``split``: the split of an input that holds one (default: from its
    name, else "train"). ``image_key``/``label_key``: the arrays, columns, members or
    extensions to read (default: detected). ``dataset``: the name the manifest records
    (default: the input's). Other arguments as for :func:`convert_arrays`.
    """
    start = time.perf_counter()
    kind = kind or detect(source)
    if kind == "idx":
        given = {"image_key": image_key, "label_key": label_key, "num_classes": num_classes,
                 "grayscale": grayscale, "resize": resize, "val_fraction": val_fraction}
        for name, value in given.items():
            if value not in (None, False):
                hint = " (an IDX dataset's files fix its splits, classes and image size)"
                if name == "val_fraction":
                    hint = (": an IDX set keeps torchvision's splits; hold out a validation part when "
                            "loading (fastmnist.holdout)")
                raise FastMNISTError(f"{name}= applies to inputs other than idx{hint}")
        return convert(source, out, dataset or "mnist", splits=[split] if split else None, mean=mean,
                       std=std, format=format, shard_size=shard_size, float32=float32, force=force,
                       progress=progress)
    if kind not in READERS:
        raise FastMNISTError(f"unknown input kind {kind!r}: expected one of {', '.join(INPUT_KINDS)}")
    reader = READERS[kind](source, split, image_key, label_key)
    dataset = dataset or _input_name(source)
    fingerprint = {}
    for part in reader.files():
        key = _input_key(part, fingerprint)
        fingerprint[key] = _part_fingerprint(part, reader.fetch(part))
    options = _foreign_options(kind, dataset, mean, std, format, shard_size, float32, grayscale, resize,
                               val_fraction, seed, image_key, label_key, num_classes, split)

    def load():
        with progress_bar(None, f"decode {kind}", progress and reader.decodes) as bar:
            read = reader.read(bar, grayscale, resize)
        if not fingerprint:  # a datasets.Dataset in memory: its decoded contents
            fingerprint.update({name: _array_fingerprint(s.images, s.labels) for name, s in read.items()})
        if reader.classes is not None:
            options["classes"] = reader.classes
        declared = reader.num_classes if num_classes is None else num_classes  # 0 is refused, not absent
        return _prepare(read, declared, grayscale, resize, val_fraction, seed)

    if not fingerprint:
        load = _loaded_first(load)
    output = Output(Path(out), format, shard_size, float32, progress)
    return build(output, dataset, False, options, fingerprint, load, mean, std, None, force, start)


def _part_fingerprint(part: InputPart, data: bytes | None) -> dict:
    """An input part's entry: a file's bytes (``data`` when fetched, else read from disk), or
    a folder's files in name order (each name, then its bytes) as one digest and their total
    size."""
    hashes = hashlib.md5(), hashlib.sha256()
    if data is not None:
        _feed(hashes, data)
        return input_entry(part.shown, len(data), *hashes)
    path = Path(part.path)
    if not path.is_dir():
        return input_entry(part.shown, hash_file(path, *hashes), *hashes)
    size = 0  # what the readers read: through links too
    for f in sorted(f for f in walked(path) if f.is_file()):
        _feed(hashes, f.relative_to(path).as_posix().encode() + b"\0")
        size += hash_file(f, *hashes)
    return input_entry(part.shown, size, *hashes)


def _array_fingerprint(images: np.ndarray, labels: np.ndarray | None) -> dict:
    """The entry of a split given in memory: the digests of its images' and labels' dtype,
    shape and bytes (``labels`` None: it has none)."""
    hashes = hashlib.md5(), hashlib.sha256()
    arrays = [np.ascontiguousarray(a) for a in (images, labels) if a is not None]
    for a in arrays:
        _feed(hashes, repr((a.dtype.str, a.shape)).encode(), a.data)
    return input_entry("(in memory)", sum(a.nbytes for a in arrays), *hashes)


def _feed(hashes, *chunks) -> None:
    for chunk in chunks:
        for h in hashes:
            h.update(chunk)


def _input_key(part: InputPart, taken: dict) -> str:
    """The manifest key of an input part: its split, numbered from the second part on."""
    base = part.split or "input"
    n = sum(1 for k in taken if k == base or k.startswith(base + "-"))
    return base if n == 0 else f"{base}-{n}"


def _input_name(source) -> str:
    """The dataset name a foreign input suggests: its file or folder name without the split."""
    if not isinstance(source, (str, Path)):
        return "datasets"
    name = re.sub(r"\{.*", "", str(source).rstrip("/")).rsplit("/", 1)[-1]
    name = re.sub(r"(\.tar|\.tgz|\.gz|\.npz|\.csv|\.parquet|\.arrow)+$", "", name)
    split = SPLIT_WORD.search(name.lower())
    name = name[:split.start()] if split else name
    return name[:100] or "custom"


def _foreign_options(kind: str, dataset: str, mean, std, format: str, shard_size: int, float32: bool,
                     grayscale: bool, resize: bool, val_fraction, seed: int, image_key, label_key,
                     num_classes: int | None, split: str | None) -> dict:
    """What a conversion from another kind was asked to do, as the manifest records it (and
    the up-to-date check compares: another ``num_classes`` or ``split`` converts again)."""
    options = {"from": kind, "dataset": dataset, "mean": mean, "std": std, "format": format,
               "shard_size": shard_size if format != "npy" else None}
    if not float32 and format != "wds":
        options["float32"] = False
    for name, asked in (("grayscale", grayscale), ("resize", resize)):
        if asked:
            options[name] = CONVERSIONS[name]
    if val_fraction is not None:
        options["val_fraction"], options["val_seed"] = val_fraction, seed
    for name, key in (("image_key", image_key), ("label_key", label_key), ("num_classes", num_classes),
                      ("split", split)):
        if key is not None:
            options[name] = key
    return options


def _loaded_first(load):
    """``load`` run now (its result is needed before the up-to-date check), and kept."""
    result = load()
    return lambda: result



@dataclass(frozen=True)
class _ArraySplit:
    """A split held in memory: uint8 images ``(N, 28, 28)``, int64 labels ``(N, *label_shape)``
    (``UNLABELLED`` each, unless ``labelled``)."""

    images: np.ndarray
    labels: np.ndarray
    labelled: bool = True

    @property
    def count(self) -> int:
        return len(self.labels)

    def chunks(self):
        for first in range(0, self.count, CHUNK):
            images = self.images[first:first + CHUNK]
            yield first, images.reshape(len(images), *IMAGE_SHAPE), self.labels[first:first + CHUNK]



def _prepare(read: dict[str, Samples], num_classes: int | None, grayscale: bool, resize: bool,
             val_fraction: float | None, seed: int) -> tuple[dict[str, _ArraySplit], int, tuple]:
    """Splits as read, checked and made uniform: images 28x28 (converted only as asked),
    labels int64 in ``0 .. num_classes - 1`` (default: the largest + 1), or ``UNLABELLED``
    for a split read without labels; a ``val`` split drawn from ``train`` if
    ``val_fraction``. Returns ``(splits, num_classes, label_shape)``."""
    for name, s in read.items():
        if not SPLIT_NAME.fullmatch(name):
            raise FastMNISTError(f"split name {name!r}: expected a lower-case word such as train, test, val")
        if len(s.images) == 0:
            raise FastMNISTError(f"{s.where}: the {name} split has no samples")
    images = {name: conform_array(s.images, s.where, grayscale, resize) for name, s in read.items()}
    labels = {name: _labels(s) for name, s in read.items() if s.labels is not None}
    for name, s in read.items():
        if name in labels and len(images[name]) != len(labels[name]):
            raise FastMNISTError(f"{s.where}: {len(images[name])} images but {len(labels[name])} labels")
    shapes = {lb.shape[1:] for lb in labels.values()}
    if len(shapes) > 1:
        raise FastMNISTError(f"labels of different shapes across splits: {sorted(shapes)}")
    label_shape = shapes.pop() if shapes else ()
    if label_shape and len(labels) < len(read):
        raise FastMNISTError("a split without labels cannot join splits of multi-label rows")
    if num_classes is None:
        num_classes = max([int(lb.max()) + 1 for lb in labels.values() if lb.size] or [1])
    if not 1 <= num_classes <= MAX_CLASSES:
        raise FastMNISTError(f"num_classes {num_classes}: expected 1..{MAX_CLASSES}")
    for name, lb in labels.items():
        bad = (lb < 0) | (lb >= num_classes)
        if bad.any():
            at = int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))
            expected = "entries" if label_shape else "a class"
            raise FastMNISTError(f"{read[name].where}: {read[name].name(at)}: label {lb[at].tolist()}, "
                                 f"expected {expected} in 0..{num_classes - 1}")
    unlabelled = {name for name in read if name not in labels}
    labels.update({name: np.full(len(images[name]), UNLABELLED, np.int64) for name in unlabelled})
    if val_fraction is not None:
        _hold_out(images, labels, val_fraction, seed)
        unlabelled |= {"val"} if "train" in unlabelled else set()
    splits = {name: _ArraySplit(images[name], labels[name], name not in unlabelled)
              for name in read | images}
    return splits, num_classes, label_shape


def _labels(s: Samples) -> np.ndarray:
    """int64 ``(N,)`` or ``(N, K)`` from labels as read (``(N, 1)`` is one class per sample)."""
    labels = np.asarray(s.labels)
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise FastMNISTError(f"{s.where}: labels of dtype {labels.dtype}, expected integers")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim not in (1, 2) or (labels.ndim == 2 and not 1 <= labels.shape[1] <= MAX_LABEL_COLUMNS):
        raise FastMNISTError(f"{s.where}: labels of shape {labels.shape}, expected (N,) or (N, K) "
                             f"with K <= {MAX_LABEL_COLUMNS}")
    too_big = labels > np.iinfo(np.int64).max if labels.dtype.kind == "u" else None
    if too_big is not None and too_big.any():  # would wrap to a negative int64
        at = int(np.argmax(too_big.reshape(len(labels), -1).any(1)))
        raise FastMNISTError(f"{s.where}: label {at}: expected a class, found {labels[at].tolist()} "
                             f"({labels.dtype}, beyond int64)")
    return labels.astype(np.int64)


def _hold_out(images: dict, labels: dict, fraction: float, seed: int) -> None:
    """Move a seeded draw of ``fraction`` of ``train`` into a new ``val`` split (both keep
    their samples in the original order)."""
    if not 0 < fraction < 1:
        raise FastMNISTError(f"val_fraction must be in (0, 1), got {fraction!r}")
    if "train" not in images:
        raise FastMNISTError("val_fraction holds out part of the train split, and there is none")
    taken = [name for name in images if name in ("val", "valid", "validation")]
    if taken:
        raise FastMNISTError(f"the input already has a {taken[0]} split; drop val_fraction")
    n = len(labels["train"])
    if not 0 < round(n * fraction) < n:
        raise FastMNISTError(f"val_fraction {fraction} of the train split's {n} samples leaves "
                             f"{'val' if round(n * fraction) == 0 else 'train'} empty")
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:round(n * fraction)]] = True
    for name, keep in (("val", held), ("train", ~held)):
        images[name], labels[name] = images["train"][keep], labels["train"][keep]
