"""A converted shard set: a directory (or a URL) holding ``manifest.json`` and the data files
it lists.

Opening a local set opens its directory once and reads the manifest and every file through
that handle, so they all come from one version of the set: a conversion that replaces the
set meanwhile (it swaps in a new directory) cannot mix versions. The manifest is validated
and every file's size checked; arrays are mapped lazily (O(1), nothing is read until it is
indexed), their ``.npy`` headers compared byte for byte with the converter's.
"""

import hashlib
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FastMNISTError, MissingFileError
from .formats.datasets import convert_command, find_raw_root
from .formats.files import hashed, open_regular
from .formats.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest, SplitInfo, npy_header, parse_manifest
from .remote.transport import DEFAULT_RETRY, Retry, expand_urls, fetch, join

REPLACED = "the set was replaced after it was opened (a conversion with --force?); open it again"


class Directory:
    """A set's directory, held open: files opened through it are that directory's even
    after a conversion renames another one into its place. Closed when collected; never
    pickled (``None`` in its place)."""

    def __init__(self, root: Path):
        self.root = root
        try:
            self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            weakref.finalize(self, os.close, self.fd)  # also at exit, while os is still there
        except FileNotFoundError:
            raise FastMNISTError(f"{root}: no such directory") from None
        except NotADirectoryError:
            raise FastMNISTError(f"{root}: not a directory") from None
        except OSError as e:
            raise FastMNISTError(f"{root}: cannot open: {e.strerror}") from None

    def open(self, name: str):
        """The regular file ``name`` of this directory, opened for binary reading."""
        try:
            return open_regular(name, dir_fd=self.fd, shown=self.root / name)
        except MissingFileError:
            if self.replaced():
                raise FastMNISTError(f"{self.root / name}: {REPLACED}") from None
            raise

    def replaced(self) -> bool:
        """Whether another directory now has this one's path (a conversion swapped it)."""
        try:
            now, held = os.stat(self.root), os.fstat(self.fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def __reduce__(self):
        return type(None), ()


def sha256_file(f) -> str:
    """Hex sha256 of an open binary file, from its start, read in 4 MiB blocks."""
    f.seek(0)
    return hashed(f, hashlib.sha256())[0].hexdigest()


def read_manifest(root) -> Manifest:
    """The validated manifest of the set at ``root``; errors name the file and the problem."""
    return _read_manifest(Directory(Path(root)))


def _read_manifest(directory: Directory) -> Manifest:
    root = directory.root
    path = root / MANIFEST
    try:
        with directory.open(MANIFEST) as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
    except MissingFileError:
        raw = find_raw_root(root)
        hint = "" if raw is None else (f"; {root} holds raw {raw[1]} files: convert them first with "
                                       f"`{convert_command(*raw)}` and open the --out directory")
        raise FastMNISTError(f"{path}: no manifest: not a converted fastmnist set{hint}") from None
    if len(text) > MAX_MANIFEST_BYTES:
        raise FastMNISTError(f"{path}: larger than a manifest may be ({MAX_MANIFEST_BYTES} bytes)")
    return parse_manifest(text, path)


@dataclass(frozen=True)
class Split:
    """One split of a local set: its validated ``info`` (a ``SplitInfo``, whose fields it
    also answers to), the directory ``root`` holding it, and that directory held open
    (``directory``; None once pickled: files are then opened by path)."""

    root: Path
    info: SplitInfo
    directory: Directory | None = None

    def __getattr__(self, field: str):
        """The manifest entry's fields, as the split's own: ``name``, ``count``, ``mean``,
        ``std``, ``formats``, ``shards``, ..."""
        if field == "info":  # not yet set (unpickling)
            raise AttributeError(field)
        return getattr(self.info, field)

    def path(self, name: str) -> Path:
        """The path of array ``name`` (a key of ``info.arrays``) or of a shard's file name."""
        return self.root / self.file(name)

    def file(self, name: str) -> str:
        """The file name of array ``name`` (a key of ``info.arrays``), or ``name`` itself."""
        return self.info.arrays[name].file if name in self.info.arrays else name

    def open(self, name: str):
        """Array ``name``'s or shard ``name``'s file, opened for binary reading, from this
        split's version of the set."""
        if self.directory is not None:
            return self.directory.open(self.file(name))
        return open_regular(self.path(name))

    def array(self, name: str, mode: str = "r", f=None) -> np.ndarray:
        """Memory-mapped array ``name`` ("images_u8", "images_f32" or "labels") of its
        file (``f`` when given, an open file of it), whose ``.npy`` header must be exactly
        the converter's for that dtype and shape; ``mode`` as ``np.memmap``'s."""
        if name not in self.info.arrays:
            raise FastMNISTError(f"{self.root}: split {self.name!r} has no {name} array "
                                 f"(it has {', '.join(self.info.arrays) or 'none'})")
        meta = self.info.arrays[name]
        header = npy_header(meta.dtype, meta.shape)
        opened = self.open(name) if f is None else None
        try:
            # pread: a file shared with forked workers has one offset, which reads would move
            found = os.pread((f or opened).fileno(), len(header), 0)
            if found != header:
                raise FastMNISTError(f"{self.path(name)}: .npy header differs from the converter's for "
                                     f"{meta.dtype} {list(meta.shape)} (C order): found {found[:120]!r}")
            return np.memmap(f or opened, dtype=meta.dtype, mode=mode, offset=len(header), shape=meta.shape)
        except (OSError, ValueError) as e:
            raise FastMNISTError(f"{self.path(name)}: cannot map: {e}") from None
        finally:
            if opened is not None:
                opened.close()  # the mapping holds the file

    def __getstate__(self):
        return {**self.__dict__, "directory": None}

    def __setstate__(self, state):
        for key, value in state.items():
            object.__setattr__(self, key, value)


@dataclass(frozen=True)
class ShardSet:
    """An opened local set: its manifest, and its directory held open (see ``Split``)."""

    root: Path
    manifest: Manifest
    directory: Directory | None = None

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.splits)

    @property
    def synthetic(self) -> bool:
        return self.manifest.synthetic

    def split(self, name: str) -> Split:
        if name not in self.manifest.splits:
            raise FastMNISTError(f"{self.root}: no split {name!r}; this set has {', '.join(self.splits)}")
        return Split(self.root, self.manifest.splits[name], self.directory)


def open_shards(root, verify: bool = False) -> ShardSet:
    """Open the set at ``root``: read the manifest, check every file's size (and sha256 if
    ``verify``), all from one version of the set. Raises :class:`FastMNISTError` naming the
    first bad file."""
    root = Path(root)
    directory = Directory(root)
    manifest = _read_manifest(directory)
    for meta in manifest.files():
        path = root / meta.file
        try:
            size = os.stat(meta.file, dir_fd=directory.fd).st_size
        except FileNotFoundError:
            if directory.replaced():
                raise FastMNISTError(f"{path}: {REPLACED}") from None
            raise FastMNISTError(f"{path}: missing shard file listed in the manifest") from None
        if size != meta.size:
            raise FastMNISTError(f"{path}: size {size} bytes, manifest says {meta.size} "
                                 "(truncated or replaced)")
        if verify:
            with directory.open(meta.file) as f:
                if sha256_file(f) != meta.sha256:
                    raise FastMNISTError(f"{path}: sha256 differs from the manifest (corrupted)")
    return ShardSet(root, manifest, directory)


def verify_shards(root) -> list[str]:
    """Re-hash every file of the set; one message per file that is missing or differs."""
    directory = Directory(Path(root))
    problems = []
    for meta in _read_manifest(directory).files():
        path = directory.root / meta.file
        try:
            with directory.open(meta.file) as f:
                size = os.fstat(f.fileno()).st_size
                if size != meta.size:
                    problems.append(f"{path}: size {size}, expected {meta.size}")
                elif sha256_file(f) != meta.sha256:
                    problems.append(f"{path}: sha256 differs from the manifest")
        except MissingFileError:
            problems.append(f"{path}: missing")
        except FastMNISTError as e:
            problems.append(str(e))
    return problems


def read_remote_manifest(url: str, retry: Retry = DEFAULT_RETRY, storage_options: dict | None = None
                         ) -> tuple[str, Manifest]:
    """The set at ``url`` (ending in "/" or not, or its ``manifest.json``'s URL): its base
    URL, ending in "/", and its validated manifest."""
    if url.endswith("/" + MANIFEST):
        url = url[:-len(MANIFEST)]
    base = url.rstrip("/") + "/"
    where = base + MANIFEST
    text = fetch(where, limit=MAX_MANIFEST_BYTES, retry=retry, storage_options=storage_options)
    return base, parse_manifest(text, where)


def verify_remote(url: str, retry: Retry = DEFAULT_RETRY, storage_options: dict | None = None) -> list[str]:
    """``verify_shards`` for the set at ``url``: fetch every file; one message per file
    that cannot be fetched or differs from the manifest."""
    base, manifest = read_remote_manifest(url, retry, storage_options)
    problems = []
    for meta in manifest.files():
        where = join(base, meta.file)
        try:
            data = fetch(where, size=meta.size, retry=retry, storage_options=storage_options)
        except FastMNISTError as e:
            problems.append(str(e))
            continue
        if hashlib.sha256(data).hexdigest() != meta.sha256:
            problems.append(f"{where}: sha256 differs from the manifest")
    return problems


def open_remote(location, split: str, retry: Retry = DEFAULT_RETRY,
                storage_options: dict | None = None) -> tuple[SplitInfo, list[str]]:
    """A split of a set by URL, and the URL of each of its shards. ``location``: the set's
    URL (shard URLs made from the manifest's names; a trailing "/" or "manifest.json" may
    end it), or the split's ``.tar`` shard URLs (a list or a brace pattern), every one of
    them, with ``manifest.json`` beside them.
    ``storage_options``: for fsspec URLs, as ``fsspec.filesystem`` takes them."""
    urls = expand_urls(location)
    whole_set = len(urls) == 1 and not urls[0].endswith(".tar")
    base, manifest = read_remote_manifest(urls[0] if whole_set else urls[0].rsplit("/", 1)[0] + "/",
                                          retry, storage_options)
    where = base + MANIFEST
    info = manifest.splits.get(split)
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
