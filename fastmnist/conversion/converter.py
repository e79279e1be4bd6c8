"""Convert torchvision-layout raw IDX files into a validated, pre-normalised shard set.

Per split it writes ``{split}_images_u8.npy`` uint8 ``(N,1,28,28)``,
``{split}_images_f32.npy`` float32 ``(N,1,28,28)`` (exactly ``ToTensor()`` +
``Normalize``) and ``{split}_labels.npy`` int64 ``(N,)``, and/or WebDataset tar shards
``{split}-000000.tar``, ... (``tar.py``), plus ``manifest.json``.
The set is built in a hidden sibling directory and swapped into place, under a lock, so
readers see the old complete set or the new one, never a mix. :func:`build` is that
writer; ``inputs.py`` feeds it from inputs other than IDX files.
"""

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FastMNISTError
from ..formats import tar
from ..formats.datasets import (
    COMPRESSIONS,
    SYNTHETIC_MARKER,
    DatasetSpec,
    RawFiles,
    convert_command,
    find_raw_root,
    get_spec,
)
from ..formats.files import BackgroundWriter, hash_file
from ..formats.idx import IMAGES, IdxReader, check_classes, label_kind
from ..formats.manifest import (
    ARRAYS,
    IMAGE_SHAPE,
    MANIFEST,
    MAX_SHARD_SAMPLES,
    MIN_STD,
    Manifest,
    array_file_name,
    describe,
    describe_split,
    npy_header,
    parse_manifest,
    shard_file_name,
)
from ..formats.normalize import normalize_u8_numpy
from ..store import open_shards, read_manifest

CHUNK = 1000  # samples per chunk: 3 MB of float32, cache-sized
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

    ``dataset``: a name of ``datasets.DATASETS`` ('mnist', 'emnist-letters', 'qmnist', ...).
    ``splits``: names to convert (default: those of the dataset's ``default_splits`` whose
    files are present).
    ``mean``/``std``: normalisation (default: MNIST's 0.1307/0.3081, else the train split's).
    ``format``: "npy" (memory-mapped arrays), "wds" (WebDataset tar shards of ``shard_size``
    samples) or "both". ``float32``: False writes no pre-normalised float32 array (4x less
    disk and page cache; the loader then normalises uint8 per batch, to the same bits).
    Returns without writing when ``out`` already holds this conversion, unless ``force``.
    """
    start = time.perf_counter()
    spec = get_spec(dataset)
    root, out = Path(root), Path(out)
    raw_files = _find_raw_files(root, out, spec, splits, download)
    options = {"dataset": spec.name, "splits": sorted(raw_files), "mean": mean, "std": std,
               "format": format, "shard_size": shard_size if format != "npy" else None}
    if not float32 and format != "wds":
        options["float32"] = False  # absent: the float32 array is written
    fingerprint = {key: _fingerprint(path, root, spec) for key, path in _raw_file_items(raw_files)}
    synthetic = (root / spec.folder / "raw" / SYNTHETIC_MARKER).exists()

    def load():
        inputs = _open_inputs(raw_files, spec)
        splits = {split: _IdxSplit(inp, spec) for split, inp in inputs.items()}
        return splits, spec.num_classes, spec.label_shape

    output = Output(out, format, shard_size, float32, progress)
    fixed = (spec.mean, spec.std) if spec.mean is not None and mean is None and std is None else None
    return build(output, spec.name, synthetic, options, fingerprint, load, mean, std, fixed, force, start)


@dataclass(frozen=True)
class Output:
    """Where a set goes and in what form (``format``, ``shard_size``, ``float32``; see
    :func:`convert`), and whether a progress bar shows."""

    out: Path
    format: str
    shard_size: int
    float32: bool
    progress: bool


def build(output: Output, dataset: str, synthetic: bool, options: dict, fingerprint: dict, load,
           mean, std, fixed, force: bool, start: float) -> ConvertResult:
    """Write the set (unless it is up to date): ``load()`` gives ``({split: source}, num_classes,
    label_shape)``, a source having ``count``, ``labelled`` and ``chunks()``; ``fixed``: the
    dataset's own (mean, std), if it has one."""
    out, format = output.out, output.format
    if format not in FORMATS:
        raise FastMNISTError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not 1 <= output.shard_size <= MAX_SHARD_SAMPLES:
        raise FastMNISTError(f"shard_size must be in 1..{MAX_SHARD_SAMPLES:,}, got {output.shard_size}")
    if mean is not None and not 0 <= float(mean) <= 1:  # of pixel values / 255 (NaN fails too)
        raise FastMNISTError(f"mean must be a number in [0, 1], got {mean!r}")
    if std is not None and not MIN_STD <= float(std) <= 1:
        raise FastMNISTError(f"std must be a number in [{MIN_STD:g}, 1], got {std!r}")
    _prepare_parent(out)
    with _lock(out):
        _remove_leftovers(out)
        if not force and _up_to_date(out, fingerprint, options):
            return ConvertResult(out, read_manifest(out), True, time.perf_counter() - start)
        if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
            raise FastMNISTError(f"{out}: refusing to replace a non-empty directory that is "
                                 "not a fastmnist set")
        splits, num_classes, label_shape = load()
        if label_shape and format != "npy":
            raise FastMNISTError(f"{dataset}: its labels are {label_shape[0]} numbers per sample, which tar "
                                 "shards (one class per sample) cannot hold; convert with format 'npy'")
        unlabelled = [split for split, src in splits.items() if not src.labelled]
        if unlabelled and format != "npy":
            raise FastMNISTError(f"{dataset}: the {unlabelled[0]} split has no labels, which tar shards "
                                 "(one class per sample) cannot hold; convert with format 'npy'")
        norm = fixed or _normalisation(dataset, splits, mean, std)
        manifest = describe(dataset, synthetic, options, fingerprint, {})
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the set is meant to be shared
            total = sum(src.count for src in splits.values())
            with progress_bar(total, f"convert {dataset}", output.progress) as bar, \
                    BackgroundWriter() as writer:
                for split, src in splits.items():
                    out_files = _SplitWriter(tmp, split, src.count, label_shape, format, output.float32,
                                             output.shard_size, norm, writer)
                    for first, images, labels in src.chunks():
                        out_files.add(first, images, labels)
                        bar.update(len(labels))
                    manifest["splits"][split] = out_files.finish(num_classes, src.labelled)
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


def progress_bar(total: int | None, desc: str, shown: bool):
    """A tqdm bar counting images (of ``total``, None: not known), or a silent stand-in (tqdm
    is not even imported)."""
    if not shown:
        return contextlib.nullcontext(types.SimpleNamespace(update=lambda n: None))
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True)


def _find_raw_files(root: Path, out: Path, spec: DatasetSpec, splits, download: bool) -> dict:
    """{split: {"images": Path, "labels": Path}}, preferring the compressed files torchvision
    downloads (their md5s are published) to the extracted ones. ``out`` is named in the
    command suggested when ``root`` is not the torchvision root."""
    raw = root / spec.folder / "raw"
    wanted = list(splits) if splits else list(spec.default_splits)
    for split in wanted:
        if split not in spec.splits:
            raise FastMNISTError(f"unknown split {split!r} of {spec.name}: expected one of "
                                 f"{', '.join(spec.splits)}")

    def locate(split, kind):
        stem = getattr(spec.splits[split], kind)
        return next((raw / (stem + c) for c in COMPRESSIONS if (raw / (stem + c)).exists()), None)

    found = {s: {k: locate(s, k) for k in ("images", "labels")} for s in wanted}
    if download and not all(all(p.values()) for p in found.values()):
        _download(root, spec)
        found = {s: {k: locate(s, k) for k in ("images", "labels")} for s in wanted}
    raw_files = {}
    for split, paths in found.items():
        missing = [raw / (getattr(spec.splits[split], k) + "[.gz|.xz]")
                   for k, p in paths.items() if p is None]
        if not missing:
            raw_files[split] = paths
        elif splits or len(missing) == 1:  # asked for explicitly, or half a split present
            raise FastMNISTError(f"{missing[0]}: file not found (needed for the {split} split)")
    if not raw_files:
        found = find_raw_root(root, spec.name)
        if found is not None and found[0] != root:
            command = convert_command(*found, str(out))
            raise FastMNISTError(f"{raw}: no raw files here; --root is the directory that holds "
                                 f"<Dataset>/raw/, here {found[0]}: run `{command}`")
        names = sorted({getattr(f, k) for f in spec.splits.values() for k in ("images", "labels")})
        raise FastMNISTError(
            f"{raw}: no {spec.folder} raw files found for {spec.name}; put torchvision's files "
            f"({', '.join(names)}, or compressed) there, run with --download, or make synthetic "
            f"ones with `fastmnist synth --dataset {spec.name} --root {root}`"
        )
    return raw_files


def _download(root: Path, spec: DatasetSpec) -> None:
    try:
        import torchvision.datasets
    except ImportError:
        raise FastMNISTError(f"{root}: --download uses torchvision's downloader, which is not "
                             "installed (pip install torchvision, or 'fastmnist[bench]')") from None

    try:
        for kwargs in spec.download_args:
            getattr(torchvision.datasets, spec.folder)(str(root), download=True, **kwargs)
    except Exception as e:
        raise FastMNISTError(
            f"{root}: download of {spec.folder} failed ({type(e).__name__}: {' '.join(str(e).split())}); "
            f"offline, "
            f"copy torchvision's raw files into "
            f"{root / spec.folder / 'raw'} and convert without --download"
        ) from None


def _raw_file_items(raw_files: dict):
    for split, paths in sorted(raw_files.items()):
        for kind, path in paths.items():
            yield f"{split}-{kind}", path


def _fingerprint(path: Path, root: Path, spec: DatasetSpec) -> dict:
    """A raw file's manifest entry: its name relative to ``root``, size and digests."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = hash_file(path, md5, sha)
    expected = spec.md5.get(path.name)
    return input_entry(path.relative_to(root).as_posix(), size, md5, sha,
                  # torchvision publishes md5s of the .gz files only; None: cannot tell
                  None if expected is None else md5.hexdigest() == expected)


def input_entry(file: str, size: int, md5, sha256, canonical: bool | None = None) -> dict:
    """An input's manifest entry (``md5``/``sha256``: hashlib objects)."""
    return {"file": file, "size": size, "md5": md5.hexdigest(), "sha256": sha256.hexdigest(),
            "canonical": canonical}


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
    same_inputs = {k: v.sha256 for k, v in m.inputs.items()} == {
        k: v["sha256"] for k, v in fingerprint.items()
    }
    asked = {k: v for k, v in m.options.items() if k != "classes"}  # classes: read from the input
    return same_inputs and asked == options


@dataclass(frozen=True)
class _Input:
    """A split's raw files (headers checked) and the ``count`` rows of them it takes."""

    images: Path
    labels: Path
    files: RawFiles
    count: int


def _open_inputs(raw_files: dict, spec: DatasetSpec) -> dict[str, _Input]:
    """Every split's files, their headers checked against each other before anything is read."""
    inputs = {}
    for split, paths in raw_files.items():
        with IdxReader(paths["images"], IMAGES) as images, \
                IdxReader(paths["labels"], label_kind(spec.label_columns)) as labels:
            if images.count != labels.count:
                raise FastMNISTError(f"{paths['images']}: {images.count} images but "
                                     f"{paths['labels']} has {labels.count} labels")
        files = spec.splits[split]
        count = len(range(images.count)[files.start:files.stop])
        inputs[split] = _Input(paths["images"], paths["labels"], files, count)
    return inputs


@dataclass(frozen=True)
class _IdxSplit:
    """A split read from its raw IDX files a chunk at a time."""

    inp: _Input
    spec: DatasetSpec
    labelled = True  # IDX splits always have their labels file

    @property
    def count(self) -> int:
        return self.inp.count

    def chunks(self):
        """The split's samples ``CHUNK`` at a time, validated: ``(first, images, labels)``, uint8
        images ``(n, 1, 28, 28)`` and int64 labels ``(n, *spec.label_shape)``."""
        inp, spec = self.inp, self.spec
        start, stop = inp.files.start, inp.files.stop
        with IdxReader(inp.images, IMAGES) as fi, \
                IdxReader(inp.labels, label_kind(spec.label_columns)) as fl:
            first = 0
            for images, labels in zip(fi.chunks(CHUNK, start, stop), fl.chunks(CHUNK, start, stop),
                                      strict=True):
                classes = labels[:, 0] if spec.label_columns else labels
                check_classes(inp.labels, classes, spec.num_classes, start + first)
                kept = labels if spec.extended else classes
                yield first, images.reshape(len(images), *IMAGE_SHAPE), kept.astype(np.int64)
                first += len(images)



def _normalisation(dataset: str, splits: dict, mean, std) -> tuple[float, float]:
    if mean is not None and std is not None:
        return float(mean), float(std)
    if "train" not in splits:
        raise FastMNISTError(f"{dataset}: mean/std come from the train split, which is "
                             "not being converted; pass --mean and --std")
    # From a histogram of the pixel values, so memory stays flat: exact sums, in float64.
    counts = np.zeros(256, np.int64)
    for _, images, _ in splits["train"].chunks():
        counts += np.bincount(images.reshape(-1), minlength=256)
    values, n = np.arange(256) / 255, int(counts.sum())
    if n == 0:
        raise FastMNISTError(f"{dataset}: the train split has no samples to take mean/std from; pass --mean "
                             "and --std")
    computed_mean = float((counts * values).sum() / n)
    computed_std = float(np.sqrt((counts * (values - computed_mean) ** 2).sum() / n))
    if std is None and computed_std < MIN_STD:
        raise FastMNISTError(f"{dataset}: every pixel of the train split is {round(computed_mean * 255)} "
                             "(std 0): nothing to normalise by; pass --mean and --std")
    return (computed_mean if mean is None else float(mean), computed_std if std is None else float(std))


class _SplitWriter:
    """A split's files, written from its samples in order (chunks of ``add``): the ``.npy``
    arrays (the float32 one only if ``float32``) and/or the tar shards of ``shard_size``."""

    def __init__(self, tmp: Path, split: str, count: int, label_shape: tuple, format: str,
                 float32: bool, shard_size: int, norm: tuple[float, float], writer: BackgroundWriter):
        self.tmp, self.split, self.count, self.label_shape = tmp, split, count, label_shape
        self.shard_size, self.norm, self.writer = shard_size, norm, writer
        self.arrays, self.shards, self.shard = {}, [], None
        if format in ("npy", "both"):
            names = ["images_u8", *(["images_f32"] if float32 else []), "labels"]
            for name in names:
                shape = (count, *label_shape) if name == "labels" else (count, *IMAGE_SHAPE)
                entry = {"file": array_file_name(split, name), "dtype": ARRAYS[name], "shape": list(shape)}
                self.arrays[name] = writer.open(tmp / entry["file"], entry)
                writer.append(self.arrays[name], npy_header(ARRAYS[name], shape))
        self.wds = format in ("wds", "both")

    def add(self, first: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Samples ``first, first + 1, ...``: uint8 images ``(n, 1, 28, 28)``, int64 labels."""
        w = self.writer
        for name, target in self.arrays.items():
            if name == "images_f32":
                w.append(target, normalize_u8_numpy(images, *self.norm,
                                                    out=np.empty(images.shape, np.float32)))
            else:
                w.append(target, images if name == "images_u8" else labels)
        at, end = first, first + len(labels)
        while self.wds and at < end:
            number = at // self.shard_size
            shard_first = number * self.shard_size
            shard_stop = min(shard_first + self.shard_size, self.count)
            if self.shard is None:
                entry = {"file": shard_file_name(self.split, number), "first": shard_first,
                         "count": shard_stop - shard_first}
                self.shard, self.shard_labels = w.open(self.tmp / entry["file"], entry), hashlib.sha256()
                self.shards.append(entry)
            stop = min(end, shard_stop)
            part = slice(at - first, stop - first)
            w.append(self.shard, tar.records(at, images[part], labels[part]))
            self.shard_labels.update(tar.labels_bytes(labels[part]))
            if stop == shard_stop:
                w.append(self.shard, tar.archive_padding(shard_stop - shard_first))
                w.close(self.shard)
                self.shard[2]["labels_sha256"] = self.shard_labels.hexdigest()
                self.shard = None
            at = stop

    def finish(self, num_classes: int, labelled: bool = True) -> dict:
        """The split's manifest entry (its files complete once the writer is done)."""
        for target in self.arrays.values():
            self.writer.close(target)
        return describe_split(self.count, *self.norm, num_classes,
                              {name: target[2] for name, target in self.arrays.items()}, self.label_shape,
                              {"shard_size": self.shard_size, "shards": self.shards} if self.wds else None,
                              labelled)


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
