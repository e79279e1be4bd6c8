"""A converted shard set: a directory (or a URL) holding ``manifest.json`` and the data files
it lists.

Opening a local set reads and validates the manifest and checks every file's size; arrays
are mapped lazily (``np.load(mmap_mode=...)``: O(1), nothing is read until it is indexed).
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FastMNISTError
from .formats.datasets import convert_command, find_raw_root
from .formats.files import hashed
from .formats.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest, SplitInfo, parse_manifest
from .remote.transport import DEFAULT_RETRY, Retry, expand_urls, fetch, join


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    with open(path, "rb") as f:
        return hashed(f, hashlib.sha256())[0].hexdigest()


def read_manifest(root) -> Manifest:
    """The validated manifest of the set at ``root``; errors name the file and the problem."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise FastMNISTError(f"{root}: {'not a directory' if root.exists() else 'no such directory'}")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise FastMNISTError(f"{path}: larger than a manifest may be ({MAX_MANIFEST_BYTES} bytes)")
        text = path.read_bytes()
    except FileNotFoundError:
        raw = find_raw_root(root)
        hint = "" if raw is None else (f"; {root} holds raw {raw[1]} files: convert them first with "
                                       f"`{convert_command(*raw)}` and open the --out directory")
        raise FastMNISTError(f"{path}: no manifest: not a converted fastmnist set{hint}") from None
    except OSError as e:
        raise FastMNISTError(f"{path}: unreadable manifest: {e}") from None
    return parse_manifest(text, path)


@dataclass(frozen=True)
class Split:
    """One split of a local set: its validated ``info`` (a ``SplitInfo``, whose fields it
    also answers to) and the directory ``root`` holding it."""

    root: Path
    info: SplitInfo

    def __getattr__(self, field: str):
        """The manifest entry's fields, as the split's own: ``name``, ``count``, ``mean``,
        ``std``, ``formats``, ``shards``, ..."""
        if field == "info":  # not yet set (unpickling)
            raise AttributeError(field)
        return getattr(self.info, field)

    def path(self, name: str) -> Path:
        """The path of array ``name`` (a key of ``info.arrays``) or of a shard's file name."""
        return self.root / (self.info.arrays[name].file if name in self.info.arrays else name)

    def array(self, name: str, mode: str = "r") -> np.ndarray:
        """Memory-mapped array ``name`` ("images_u8", "images_f32" or "labels");
        ``mode`` as ``np.load``'s mmap_mode."""
        if name not in self.info.arrays:
            raise FastMNISTError(f"{self.root}: split {self.name!r} has no {name} array "
                                 f"(it has {', '.join(self.info.arrays) or 'none'})")
        meta = self.info.arrays[name]
        try:
            arr = np.load(self.path(name), mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise FastMNISTError(f"{self.path(name)}: cannot map: {e}") from None
        if arr.shape != meta.shape or str(arr.dtype) != meta.dtype:
            raise FastMNISTError(f"{self.path(name)}: expected {meta.dtype} {list(meta.shape)}, "
                                 f"found {arr.dtype} {list(arr.shape)}")
        return arr


@dataclass(frozen=True)
class ShardSet:
    """An opened local set: its manifest; arrays are mapped on demand."""

    root: Path
    manifest: Manifest

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.splits)

    @property
    def synthetic(self) -> bool:
        return self.manifest.synthetic

    def split(self, name: str) -> Split:
        if name not in self.manifest.splits:
            raise FastMNISTError(f"{self.root}: no split {name!r}; this set has {', '.join(self.splits)}")
        return Split(self.root, self.manifest.splits[name])


def open_shards(root, verify: bool = False) -> ShardSet:
    """Open the set at ``root``: read the manifest, check every file's size (and sha256 if
    ``verify``). Raises :class:`FastMNISTError` naming the first bad file."""
    root = Path(root)
    manifest = read_manifest(root)
    for meta in manifest.files():
        path = root / meta.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FastMNISTError(f"{path}: missing shard file listed in the manifest") from None
        if size != meta.size:
            raise FastMNISTError(f"{path}: size {size} bytes, manifest says {meta.size} "
                                 "(truncated or replaced)")
        if verify and sha256_file(path) != meta.sha256:
            raise FastMNISTError(f"{path}: sha256 differs from the manifest (corrupted)")
    return ShardSet(root, manifest)


def verify_shards(root) -> list[str]:
    """Re-hash every file of the set; one message per file that is missing or differs."""
    root = Path(root)
    problems = []
    for meta in read_manifest(root).files():
        path = root / meta.file
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != meta.size:
            problems.append(f"{path}: size {path.stat().st_size}, expected {meta.size}")
        elif sha256_file(path) != meta.sha256:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


def open_remote(location, split: str, retry: Retry = DEFAULT_RETRY,
                storage_options: dict | None = None) -> tuple[SplitInfo, list[str]]:
    """A split of a set by URL, and the URL of each of its shards. ``location``: the set's
    URL ending in "/" (shard URLs made from the manifest's names), or the split's shard
    URLs (a list or a brace pattern), every one of them, with ``manifest.json`` beside them.
    ``storage_options``: for fsspec URLs, as ``fsspec.filesystem`` takes them."""
    urls = expand_urls(location)
    whole_set = len(urls) == 1 and urls[0].endswith("/")
    base = urls[0] if whole_set else urls[0].rsplit("/", 1)[0] + "/"
    where = base + MANIFEST
    text = fetch(where, limit=MAX_MANIFEST_BYTES, retry=retry, storage_options=storage_options)
    info = parse_manifest(text, where).splits.get(split)
    if info is None:
        raise FastMNISTError(f"{where}: no split {split!r}")
    if not info.shards:
        raise FastMNISTError(f"{where}: split {split!r} has no tar shards")
    if whole_set:
        return info, [join(base, s.file) for s in info.shards]
    given = {u.rsplit("/", 1)[-1]: u for u in urls}
    names = [s.file for s in info.shards]
    for name, url in given.items():
        if name not in names:
            raise FastMNISTError(f"{url}: not a {split} shard of {where}")
    for name in names:
        if name not in given:
            raise FastMNISTError(f"{base}{name}: {split} shard missing from the listing "
                                 f"(every shard is needed for an exact epoch)")
    return info, [given[name] for name in names]
