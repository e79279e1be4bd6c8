"""Convert torchvision-layout raw IDX files into a validated, pre-normalised shard set.

Per split it writes ``{split}_images_u8.npy`` uint8 ``(N,1,28,28)``,
``{split}_images_f32.npy`` float32 ``(N,1,28,28)`` (exactly ``ToTensor()`` +
``Normalize``) and ``{split}_labels.npy`` int64 ``(N,)``, and/or WebDataset tar shards
``{split}-000000.tar``, ... (``tar.py``), plus ``manifest.json``.
The set is built in a hidden sibling directory and swapped into place, under a lock, so
readers see the old complete set or the new one, never a mix.
"""

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .datasets import SPLITS, DatasetSpec, get_spec
from .errors import FastMNISTError
from .files import BackgroundWriter
from .idx import read_images, read_labels
from .manifest import (
    ARRAYS,
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    array_file_name,
    npy_header,
    parse_manifest,
    shard_file_name,
)
from .normalize import normalize_u8_numpy
from .store import open_shards, read_manifest
from .synth import SYNTHETIC_MARKER
from .tar import shard_chunks

_CHUNK = 1000  # samples per chunk: 3 MB of float32, cache-sized
FORMATS = ("npy", "wds", "both")


@dataclass
class ConvertResult:
    out: Path
    manifest: Manifest
    skipped: bool  # True: the set was already up to date and nothing was written
    seconds: float


def convert(root, out, dataset: str = "mnist", *, splits=None, mean=None, std=None,
            format: str = "npy", shard_size: int = 10000, float32: bool = True, force: bool = False,
            download: bool = False, progress: bool = True) -> ConvertResult:
    """Convert the raw files under ``root`` (torchvision layout) into the set at ``out``.

    ``splits``: names to convert (default: every split whose files are present).
    ``mean``/``std``: normalisation (default: MNIST's 0.1307/0.3081, else the train split's).
    ``format``: "npy" (memory-mapped arrays), "wds" (WebDataset tar shards of ``shard_size``
    samples) or "both". ``float32``: False writes no pre-normalised float32 array (4x less
    disk and page cache; the loader then normalises uint8 per batch, to the same bits).
    Returns without writing when ``out`` already holds this conversion, unless ``force``.
    """
    start = time.perf_counter()
    spec = get_spec(dataset)
    if format not in FORMATS:
        raise FastMNISTError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if shard_size < 1:
        raise FastMNISTError(f"shard_size must be positive, got {shard_size}")
    root, out = Path(root), Path(out)
    sources = _find_sources(root, spec, splits, download)
    options = {"dataset": spec.name, "splits": sorted(sources), "mean": mean, "std": std,
               "format": format, "shard_size": shard_size if format != "npy" else None}
    if not float32 and format != "wds":
        options["float32"] = False  # absent: the float32 array is written
    fingerprint = {key: _fingerprint(path, spec) for key, path in _source_items(sources)}
    _prepare_parent(out)
    with _lock(out):
        _remove_leftovers(out)
        if not force and _up_to_date(out, fingerprint, options):
            return ConvertResult(out, read_manifest(out), True, time.perf_counter() - start)
        if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
            raise FastMNISTError(f"{out}: refusing to replace a non-empty directory that is "
                                 "not a fastmnist set")
        data = {split: (read_images(p["images"]), read_labels(p["labels"], spec.num_classes))
                for split, p in sources.items()}
        for split, (images, labels) in data.items():
            if len(images) != len(labels):
                raise FastMNISTError(
                    f"{sources[split]['images']}: {len(images)} images but "
                    f"{sources[split]['labels']} has {len(labels)} labels"
                )
        norm = _normalisation(spec, data, mean, std)
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_by": f"fastmnist {__version__}",
            "dataset": spec.name,
            "synthetic": (root / spec.folder / "raw" / SYNTHETIC_MARKER).exists(),
            "options": options,
            "sources": fingerprint,
            "splits": {},
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the set is meant to be shared
            passes = {"npy": 1 + float32, "wds": 1, "both": 2 + float32}[format]
            total = passes * sum(len(labels) for _, labels in data.values())
            with _progress_bar(total, f"convert {spec.name}", progress) as bar, BackgroundWriter() as writer:
                for split, (images, labels) in data.items():
                    info = {"count": len(labels), "image_shape": list(images.shape[1:]),
                            "mean": norm[0], "std": norm[1], "num_classes": spec.num_classes,
                            "files": {}}
                    if format in ("npy", "both"):
                        info["files"] = _write_arrays(tmp, split, images, labels, *norm, float32, bar,
                                                      writer)
                    if format in ("wds", "both"):
                        info["wds"] = {"shard_size": shard_size, "shards": _write_shards(
                            tmp, split, images, labels, shard_size, bar, writer)}
                    manifest["splits"][split] = info
            text = json.dumps(manifest, indent=2) + "\n"
            written = parse_manifest(text, tmp / MANIFEST)  # what every reader will check
            _write_manifest(tmp, text)
            _swap_into_place(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise FastMNISTError(f"{e.filename or out}: cannot write: {e.strerror}") from e
            raise
    return ConvertResult(out, written, False, time.perf_counter() - start)


def _progress_bar(total: int, desc: str, shown: bool):
    """A tqdm bar counting images, or a silent stand-in (tqdm is not even imported)."""
    if not shown:
        return contextlib.nullcontext(types.SimpleNamespace(update=lambda n: None))
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True)


def _find_sources(root: Path, spec: DatasetSpec, splits, download: bool) -> dict:
    """{split: {"images": Path, "labels": Path}}, preferring the ``.gz`` torchvision ships."""
    raw = root / spec.folder / "raw"
    wanted = list(splits) if splits else list(SPLITS)
    for split in wanted:
        if split not in SPLITS:
            raise FastMNISTError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")

    def locate(split, kind):
        for name in (spec.stem(split, kind) + ".gz", spec.stem(split, kind)):
            if (raw / name).exists():
                return raw / name
        return None

    found = {s: {k: locate(s, k) for k in ("images", "labels")} for s in wanted}
    if download and not all(all(p.values()) for p in found.values()):
        _download(root, spec)
        found = {s: {k: locate(s, k) for k in ("images", "labels")} for s in wanted}
    sources = {}
    for split, paths in found.items():
        missing = [raw / (spec.stem(split, k) + "[.gz]") for k, p in paths.items() if p is None]
        if not missing:
            sources[split] = paths
        elif splits or len(missing) == 1:  # asked for explicitly, or half a split present
            raise FastMNISTError(f"{missing[0]}: file not found (needed for the {split} split)")
    if not sources:
        raise FastMNISTError(
            f"{raw}: no {spec.folder} raw files found; put torchvision's files "
            f"({', '.join(spec.md5)}) there, run with --download, or make synthetic ones "
            f"with `fastmnist synth --root {root}`"
        )
    return sources


def _download(root: Path, spec: DatasetSpec) -> None:
    try:
        import torchvision.datasets
    except ImportError:
        raise FastMNISTError(f"{root}: --download uses torchvision's downloader, which is not "
                             "installed (pip install torchvision, or 'fastmnist[bench]')") from None

    try:
        getattr(torchvision.datasets, spec.folder)(str(root), train=True, download=True)
    except Exception as e:
        raise FastMNISTError(
            f"{root}: download of {spec.folder} failed ({type(e).__name__}: {' '.join(str(e).split())}); "
            f"offline, "
            f"copy torchvision's files ({', '.join(spec.md5)}) into "
            f"{root / spec.folder / 'raw'} and convert without --download"
        ) from None


def _source_items(sources: dict):
    for split, paths in sorted(sources.items()):
        for kind, path in paths.items():
            yield f"{split}-{kind}", path


def _fingerprint(path: Path, spec: DatasetSpec) -> dict:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            md5.update(block)
            sha.update(block)
    expected = spec.md5.get(path.name)
    return {
        "file": str(path),
        "size": path.stat().st_size,
        "md5": md5.hexdigest(),
        "sha256": sha.hexdigest(),
        # torchvision publishes md5s of the .gz files only; None: cannot tell
        "canonical": None if expected is None else md5.hexdigest() == expected,
    }


def _prepare_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastMNISTError(f"{out.parent}: cannot create output directory: {e.strerror}") from e
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise FastMNISTError(f"{out.parent}: output directory is not writable")


@contextlib.contextmanager
def _lock(out: Path):
    """Serialise conversions into ``out`` across processes."""
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(out: Path) -> None:
    """Delete temporary directories a killed conversion left beside ``out``."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _up_to_date(out: Path, fingerprint: dict, options: dict) -> bool:
    try:
        shards = open_shards(out)
    except FastMNISTError:
        return False
    m = shards.manifest
    same_sources = {k: v.sha256 for k, v in m.sources.items()} == {
        k: v["sha256"] for k, v in fingerprint.items()
    }
    return same_sources and m.options == options


def _normalisation(spec: DatasetSpec, data: dict, mean, std) -> tuple[float, float]:
    if mean is not None and std is not None:
        return float(mean), float(std)
    if spec.mean is not None and mean is None and std is None:
        return spec.mean, spec.std
    if "train" not in data:
        raise FastMNISTError(f"{spec.name}: mean/std come from the train split, which is "
                             "not being converted; pass --mean and --std")
    pixels = data["train"][0].astype(np.float64) / 255
    return (float(pixels.mean()) if mean is None else float(mean),
            float(pixels.std()) if std is None else float(std))


def _write_arrays(tmp: Path, split: str, images: np.ndarray, labels: np.ndarray,
                  mean: float, std: float, float32: bool, bar, writer: BackgroundWriter) -> dict:
    """The split's ``.npy`` files (the float32 one only if ``float32``); returns their
    manifest entries, complete once ``writer`` is done."""

    def normalised():
        for i in range(0, len(images), _CHUNK):
            part = images[i:i + _CHUNK]
            yield normalize_u8_numpy(part, mean, std, out=np.empty(part.shape, np.float32))
            bar.update(len(part))

    def chunks(array):
        for i in range(0, len(array), _CHUNK):
            part = np.ascontiguousarray(array[i:i + _CHUNK])
            yield part
            bar.update(len(part))

    files = {"images_u8": _write_npy(tmp, split, "images_u8", images.shape, chunks(images), writer)}
    if float32:
        files["images_f32"] = _write_npy(tmp, split, "images_f32", images.shape, normalised(), writer)
    files["labels"] = _write_npy(tmp, split, "labels", labels.shape, [labels.astype(np.int64)], writer)
    return files


def _write_npy(tmp: Path, split: str, array: str, shape, parts, writer: BackgroundWriter) -> dict:
    """Write ``array`` of ``split`` as an ``.npy`` from C-contiguous parts of its dtype;
    returns its manifest entry, complete once ``writer`` is done."""
    dtype = ARRAYS[array]
    entry = {"file": array_file_name(split, array), "dtype": dtype, "shape": list(shape)}
    writer.write(tmp / entry["file"], itertools.chain([npy_header(dtype, shape)], parts), entry)
    return entry


def _write_shards(tmp: Path, split: str, images: np.ndarray, labels: np.ndarray,
                  shard_size: int, bar, writer: BackgroundWriter) -> list[dict]:
    """The split's tar shards of ``shard_size`` samples; returns their manifest entries,
    complete once ``writer`` is done."""
    shards = []
    for number, first in enumerate(range(0, len(labels), shard_size)):
        stop = min(first + shard_size, len(labels))
        entry = {"file": shard_file_name(split, number), "first": first, "count": stop - first}
        writer.write(tmp / entry["file"], shard_chunks(first, images[first:stop], labels[first:stop]), entry)
        bar.update(stop - first)
        shards.append(entry)
    return shards


def _write_manifest(tmp: Path, text: str) -> None:
    with open(tmp / MANIFEST, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Put the set built in ``tmp`` at ``out``. An existing ``out`` is exchanged with ``tmp``
    in one atomic step, then deleted; where the file system cannot exchange, it is moved
    aside first (a crash between the two renames leaves no set at ``out``)."""
    old = None
    if out.exists():
        if _exchange(tmp, out):
            _fsync_dir(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous set
            return
        old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the C library or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
