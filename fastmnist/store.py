"""A converted shard set on disk: ``manifest.json`` plus contiguous ``.npy`` arrays.

Opening reads the manifest, checks each file's size and maps arrays lazily
(``np.load(mmap_mode=...)``: O(1), nothing is read until it is indexed).
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FastMNISTError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = ("images_u8", "images_f32", "labels")  # per split: uint8/float32 (N,1,28,28), int64 (N,)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path) -> dict:
    """The parsed manifest of the set at ``root``; errors name the file and the problem."""
    path = Path(root) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FastMNISTError(f"{path}: no manifest: not a converted fastmnist set") from None
    except OSError as e:
        raise FastMNISTError(f"{path}: unreadable manifest: {e}") from None
    return parse_manifest(text, path)


def parse_manifest(text, where) -> dict:
    """A manifest from its JSON text; ``where`` (a path or URL) names it in errors."""
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise FastMNISTError(f"{where}: unreadable manifest: {e}") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FastMNISTError(
            f"{where}: format_version {version!r} is newer than this fastmnist reads "
            f"({FORMAT_VERSION}); upgrade fastmnist or re-convert"
        )
    return manifest


@dataclass(frozen=True)
class Split:
    """One split of a set: ``count`` samples with normalisation ``mean``/``std``."""

    root: Path
    name: str
    info: dict

    @property
    def count(self) -> int:
        return self.info["count"]

    @property
    def mean(self) -> float:
        return self.info["mean"]

    @property
    def std(self) -> float:
        return self.info["std"]

    @property
    def formats(self) -> list[str]:
        """"npy" when the arrays are present, "wds" when tar shards are."""
        return [f for f, present in (("npy", self.info["files"]), ("wds", self.info.get("wds")))
                if present]

    def path(self, array: str) -> Path:
        return self.root / self.info["files"][array]["file"]

    def array(self, array: str, mode: str = "r") -> np.ndarray:
        """Memory-mapped ``array`` (one of ``ARRAYS``); ``mode`` as ``np.load``'s mmap_mode."""
        arr = np.load(self.path(array), mmap_mode=mode)
        meta = self.info["files"][array]
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            raise FastMNISTError(
                f"{self.path(array)}: expected {meta['dtype']} {meta['shape']}, "
                f"found {arr.dtype} {list(arr.shape)}"
            )
        return arr


@dataclass(frozen=True)
class ShardSet:
    """An opened set: its manifest and per-split metadata; arrays are mapped on demand."""

    root: Path
    manifest: dict

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest.get("synthetic"))

    def split(self, name: str) -> Split:
        if name not in self.manifest["splits"]:
            raise FastMNISTError(
                f"{self.root}: no split {name!r}; this set has {', '.join(self.splits)}"
            )
        return Split(self.root, name, self.manifest["splits"][name])


def open_shards(root, verify: bool = False) -> ShardSet:
    """Open the set at ``root``: read the manifest, check every file's size (and sha256 if
    ``verify``). Raises :class:`FastMNISTError` naming the first bad file."""
    root = Path(root)
    manifest = read_manifest(root)
    for path, meta in _files(root, manifest):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FastMNISTError(f"{path}: missing shard file listed in the manifest") from None
        if size != meta["size"]:
            raise FastMNISTError(
                f"{path}: size {size} bytes, manifest says {meta['size']} (truncated or replaced)"
            )
        if verify and sha256_file(path) != meta["sha256"]:
            raise FastMNISTError(f"{path}: sha256 differs from the manifest (corrupted)")
    return ShardSet(root, manifest)


def verify_shards(root) -> list[str]:
    """Re-hash every file of the set; one message per file that is missing or differs."""
    root = Path(root)
    problems = []
    for path, meta in _files(root, read_manifest(root)):
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{path}: size {path.stat().st_size}, expected {meta['size']}")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


def _files(root: Path, manifest: dict):
    for split in manifest["splits"].values():
        for meta in [*split["files"].values(), *split.get("wds", {}).get("shards", [])]:
            yield root / meta["file"], meta
