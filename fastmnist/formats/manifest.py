"""``manifest.json``, the single source of truth of a shard set, read into validated objects.

A manifest is hostile input (it may come from a server or a bucket someone else controls):
:func:`parse_manifest` checks types, ranges, counts that add up, sizes that follow from the
counts, and that every file name is exactly the one the converter writes for its place
(so no separator, ``..``, absolute path or shell character gets through), before any data
file is opened or any buffer allocated. Errors name the manifest and the field.
"""

import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..errors import FastMNISTError
from . import tar
from .idx import IMAGE_SIDE

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_SAMPLES = 100_000_000  # per split (MNIST8M has 8.1M)
MAX_SHARD_SAMPLES = 1_000_000
MAX_CLASSES = 1000  # tar shards hold labels of up to 3 digits
MAX_LABEL_COLUMNS = 64  # qmnist-extended has 8
UNLABELLED = -1  # the label of every sample of a split converted without labels
MIN_STD = 1e-4  # a pixel standard deviation of 0.03 grey levels; below it, (x - mean) / std overflows
IMAGE_SHAPE = (1, IMAGE_SIDE, IMAGE_SIDE)  # one image, as stored and yielded
ARRAYS = {"images_u8": "uint8", "images_f32": "float32", "labels": "int64"}  # name -> dtype
SPLIT_NAME = re.compile(r"[a-z][a-z0-9]{0,31}")  # what a split may be called
_SHA256, _MD5 = re.compile(r"[0-9a-f]{64}"), re.compile(r"[0-9a-f]{32}")


def array_file_name(split: str, array: str) -> str:
    """The converter's name for ``array`` (a key of ``ARRAYS``) of ``split``."""
    return f"{split}_{array}.npy"


def shard_file_name(split: str, number: int) -> str:
    """The converter's name for tar shard ``number`` of ``split``."""
    return f"{split}-{number:06d}.tar"


def check_unlabelled(path, labels: np.ndarray) -> None:
    """Raise naming ``path`` and the label unless every entry of ``labels`` is ``UNLABELLED``."""
    wrong = labels != UNLABELLED
    if wrong.any():
        at = int(np.argmax(wrong))
        raise FastMNISTError(f"{path}: label {at}: expected {UNLABELLED} (the split has no labels), "
                             f"found {labels[at]}")


def npy_size(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of an ``.npy`` file (format 1.0, as the converter writes it) of that array."""
    return len(npy_header(dtype, shape)) + math.prod(shape) * np.dtype(dtype).itemsize


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": tuple(shape)})
    return header.getvalue()


def describe(dataset: str, synthetic: bool, options: dict, inputs: dict, splits: dict) -> dict:
    """A manifest as the converter writes it (JSON-ready): ``inputs`` the raw files'
    fingerprints (under the key "sources"), ``splits`` each from :func:`describe_split`."""
    return {"format_version": FORMAT_VERSION, "created_by": f"fastmnist {__version__}", "dataset": dataset,
            "synthetic": synthetic, "options": options, "sources": inputs, "splits": splits}


def describe_split(count: int, mean: float, std: float, num_classes: int, arrays: dict,
                   label_shape: tuple = (), wds: dict | None = None, labelled: bool = True) -> dict:
    """A split's manifest entry: ``arrays`` name -> ``{file, dtype, shape, size, sha256}``,
    ``wds`` ``{shard_size, shards}`` when it has tar shards; ``labelled`` False for a split
    whose input had no labels (stored as -1)."""
    info = {"count": count, "image_shape": list(IMAGE_SHAPE), "mean": mean, "std": std,
            "num_classes": num_classes, "files": arrays}
    if label_shape:
        info["label_shape"] = list(label_shape)
    if not labelled:
        info["labelled"] = False
    if wds:
        info["wds"] = wds
    return info


@dataclass(frozen=True)
class ArrayFile:
    """One ``.npy`` array of a split."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    size: int
    sha256: str


@dataclass(frozen=True)
class Shard:
    """One tar shard: samples ``first .. first + count - 1`` of its split."""

    file: str
    first: int
    count: int
    size: int
    sha256: str
    labels_sha256: str | None = None  # of its labels as int64; absent in sets made before it


@dataclass(frozen=True)
class SplitInfo:
    """One split: ``count`` samples normalised with ``mean``/``std``, stored as ``arrays``
    (name -> file; empty when the set has no .npy data) and/or tar ``shards``; each label is
    one class (``label_shape`` ``()``) or, for ``qmnist-extended`` and multi-label sets,
    ``label_shape`` numbers; a split converted without labels (``labelled`` False) has
    ``UNLABELLED`` for every label."""

    name: str
    count: int
    mean: float
    std: float
    num_classes: int
    arrays: dict[str, ArrayFile]
    shards: tuple[Shard, ...]
    shard_size: int | None
    label_shape: tuple[int, ...] = ()
    labelled: bool = True  # False: the input had no labels; every label is UNLABELLED

    @property
    def formats(self) -> list[str]:
        """"npy" when the arrays are present, "wds" when tar shards are."""
        return [f for f, present in (("npy", self.arrays), ("wds", self.shards)) if present]

    def files(self) -> list[ArrayFile | Shard]:
        return [*self.arrays.values(), *self.shards]


@dataclass(frozen=True)
class InputFile:
    """A raw input the set was converted from."""

    file: str
    size: int
    md5: str
    sha256: str
    canonical: bool | None  # md5 equals torchvision's; None: torchvision lists none for it


@dataclass(frozen=True)
class Manifest:
    format_version: int
    created_by: str
    dataset: str
    synthetic: bool
    options: dict
    inputs: dict[str, InputFile]  # the raw files converted (the JSON key "sources")
    splits: dict[str, SplitInfo]

    def files(self) -> Iterator[ArrayFile | Shard]:
        """Every data file of every split."""
        for split in self.splits.values():
            yield from split.files()


def parse_manifest(text, where) -> Manifest:
    """A validated manifest from its JSON text (str or bytes); ``where`` (a path or URL)
    names it in errors. Raises :class:`FastMNISTError` on anything the converter would not
    have written."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise FastMNISTError(f"{where}: {len(text)} bytes, more than a manifest may have "
                             f"({MAX_MANIFEST_BYTES})")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FastMNISTError(f"{where}: unreadable manifest: {e}") from None
    return _Reader(str(where)).manifest(raw)


class _Reader:
    """Validation with the field's path in every error: ``where: splits.train.count: ...``."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, problem: str):
        raise FastMNISTError(f"{self.where}: {field}: {problem}")

    def get(self, obj: dict, key: str, field: str, kinds, check=None, problem=""):
        """``obj[key]``, which must be an instance of ``kinds`` (never a bool where a
        number is asked for) and pass ``check``."""
        path = f"{field}.{key}" if field else key
        if key not in obj:
            self.fail(path, "missing")
        value = obj[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
            self.fail(path, f"expected {_kind_name(kinds)}, found {type(value).__name__}")
        if check is not None and not check(value):
            self.fail(path, f"{problem}, found {_shown(value)}")
        return value

    def count(self, obj, key, field, low, high):
        return self.get(obj, key, field, int, lambda v: low <= v <= high,
                        f"expected an integer in {low}..{high}")

    def mapping(self, obj, key, field):
        return self.get(obj, key, field, dict)

    def manifest(self, raw) -> Manifest:
        if not isinstance(raw, dict):
            self.fail("(top level)", f"expected an object, found {type(raw).__name__}")
        version = raw.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise FastMNISTError(f"{self.where}: format_version {version} is newer than this "
                                 f"fastmnist reads ({FORMAT_VERSION}); upgrade fastmnist or re-convert")
        self.count(raw, "format_version", "", 1, FORMAT_VERSION)
        splits = self.mapping(raw, "splits", "")
        if not splits:
            self.fail("splits", "no split")
        inputs = self.mapping(raw, "sources", "")
        return Manifest(
            format_version=raw["format_version"],
            created_by=self.get(raw, "created_by", "", str, lambda v: len(v) <= 200, "too long"),
            dataset=self.get(raw, "dataset", "", str, lambda v: 0 < len(v) <= 100, "expected a name"),
            synthetic=self.get(raw, "synthetic", "", bool),
            options=self.mapping(raw, "options", ""),
            inputs={self.name(key, "sources", r"[a-z0-9-]{1,40}"): self.input_file(
                self.mapping(inputs, key, "sources"), f"sources.{key}") for key in inputs},
            splits={self.name(name, "splits", SPLIT_NAME.pattern): self.split(
                name, self.mapping(splits, name, "splits")) for name in splits},
        )

    def name(self, key: str, field: str, pattern: str) -> str:
        if not re.fullmatch(pattern, key):
            self.fail(field, f"name {_shown(key)} does not match {pattern}")
        return key

    def input_file(self, raw: dict, field: str) -> InputFile:
        return InputFile(
            file=self.get(raw, "file", field, str, lambda v: len(v) <= 4096, "too long"),
            size=self.count(raw, "size", field, 0, 1 << 50),
            md5=self.get(raw, "md5", field, str, _MD5.fullmatch, "expected 32 hex digits"),
            sha256=self.get(raw, "sha256", field, str, _SHA256.fullmatch, "expected 64 hex digits"),
            canonical=self.get(raw, "canonical", field, (bool, type(None))),
        )

    def split(self, name: str, raw: dict) -> SplitInfo:
        field = f"splits.{name}"
        count = self.count(raw, "count", field, 0, MAX_SAMPLES)
        self.get(raw, "image_shape", field, list, lambda v: tuple(v) == IMAGE_SHAPE,
                 f"expected {list(IMAGE_SHAPE)}")
        # of pixel values / 255: a mean in [0, 1], a standard deviation in (0, 1] that float32
        # divides by without overflowing
        mean = float(self.get(raw, "mean", field, (int, float), lambda v: math.isfinite(v) and 0 <= v <= 1,
                              "expected a number in [0, 1]"))
        std = float(self.get(raw, "std", field, (int, float), lambda v: MIN_STD <= v <= 1,
                             f"expected a number in [{MIN_STD:g}, 1]"))
        label_shape = ()
        if "label_shape" in raw:
            label_shape = tuple(self.get(
                raw, "label_shape", field, list,
                lambda v: len(v) == 1 and type(v[0]) is int and 1 <= v[0] <= MAX_LABEL_COLUMNS,
                f"expected [n] with n in 1..{MAX_LABEL_COLUMNS}"))
            if "wds" in raw:
                self.fail(f"{field}.label_shape", "tar shards hold one class per sample, not "
                                                  f"{label_shape[0]} numbers")
        labelled = self.get(raw, "labelled", field, bool) if "labelled" in raw else True
        if not labelled and ("wds" in raw or label_shape):
            self.fail(f"{field}.labelled", "an unlabelled split has .npy arrays of one label each only")
        arrays = self.arrays(name, count, label_shape, self.mapping(raw, "files", field), f"{field}.files")
        shards, shard_size = (), None
        if "wds" in raw:
            wds = self.mapping(raw, "wds", field)
            shard_size = self.count(wds, "shard_size", f"{field}.wds", 1, MAX_SHARD_SAMPLES)
            shards = self.shards(name, count, shard_size, self.get(wds, "shards", f"{field}.wds", list),
                                 f"{field}.wds.shards")
        if not arrays and not shards and count:
            self.fail(field, "neither .npy arrays nor tar shards")
        return SplitInfo(name, count, mean, std, self.count(raw, "num_classes", field, 1, MAX_CLASSES),
                         arrays, shards, shard_size, label_shape, labelled)

    def arrays(self, split: str, count: int, label_shape: tuple, raw: dict,
               field: str) -> dict[str, ArrayFile]:
        for key in raw:
            if key not in ARRAYS:
                self.fail(field, f"unknown array {_shown(key)}; expected {', '.join(ARRAYS)}")
        if raw and ("labels" not in raw or len(raw) < 2):
            self.fail(field, "expected labels and at least one image array")
        arrays = {}
        for key, dtype in ARRAYS.items():
            if key not in raw:
                continue
            path, meta = f"{field}.{key}", self.mapping(raw, key, field)
            shape = (count, *label_shape) if key == "labels" else (count, *IMAGE_SHAPE)
            name = array_file_name(split, key)
            self.get(meta, "file", path, str, lambda v, n=name: v == n, f"expected {name!r}")
            self.get(meta, "dtype", path, str, lambda v, d=dtype: v == d, f"expected {dtype!r}")
            self.get(meta, "shape", path, list, lambda v, s=shape: v == list(s), f"expected {list(shape)}")
            size = npy_size(dtype, shape)
            self.get(meta, "size", path, int, lambda v, s=size: v == s, f"expected {size} for that shape")
            arrays[key] = ArrayFile(name, dtype, shape, size,
                                    self.get(meta, "sha256", path, str, _SHA256.fullmatch,
                                             "expected 64 hex digits"))
        return arrays

    def shards(self, split: str, count: int, shard_size: int, raw: list, field: str) -> tuple[Shard, ...]:
        if len(raw) != -(-count // shard_size):
            self.fail(field, f"{len(raw)} shards, but {count} samples in shards of {shard_size} "
                             f"make {-(-count // shard_size)}")
        shards = []
        for number, meta in enumerate(raw):
            path, first = f"{field}[{number}]", number * shard_size
            if not isinstance(meta, dict):
                self.fail(path, f"expected an object, found {type(meta).__name__}")
            n = min(shard_size, count - first)
            name = shard_file_name(split, number)
            self.get(meta, "file", path, str, lambda v, e=name: v == e, f"expected {name!r}")
            self.get(meta, "first", path, int, lambda v, e=first: v == e, f"expected {first}")
            self.get(meta, "count", path, int, lambda v, e=n: v == e, f"expected {n}")
            size = tar.archive_size(n)
            self.get(meta, "size", path, int, lambda v, e=size: v == e, f"expected {size} for {n} samples")
            labels = self.get(meta, "labels_sha256", path, str, _SHA256.fullmatch, "expected 64 hex digits") \
                if "labels_sha256" in meta else None
            shards.append(Shard(name, first, n, size, self.get(
                meta, "sha256", path, str, _SHA256.fullmatch, "expected 64 hex digits"), labels))
        return tuple(shards)


def _tuple(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kind_name(kinds) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "an object", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in _tuple(kinds))


def _shown(value) -> str:
    """``repr(value)``, cut short: a hostile manifest may hold anything."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
