"""Readers of the places people keep MNIST-family digits other than torchvision's IDX files:
Hugging Face datasets (parquet, Arrow, a ``datasets.Dataset``), NumPy ``.npz`` archives
(Keras, MedMNIST), CSV (Kaggle), image folders (torchvision's ``ImageFolder`` layout) and
WebDataset tar shards written by other tools.

A reader lists its input files first (:meth:`Reader.files`, hashed for the manifest and the
up-to-date check) and reads them only when asked (:meth:`Reader.read`): each split as
:class:`Samples`, whose images the converter checks and makes 28x28 (``pictures.py``).
Every error names the file and the row, key or member at fault.
"""

import io
import json
import os
import re
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FastMNISTError
from . import pictures
from .datasets import INPUT_KINDS
from .files import open_regular

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# torchvision's ImageFolder's (no .gif), matched as it matches them: the lower-cased name's ending
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_WORD = re.compile(r"(?:^|[-_.])(train|test|validation|valid|val)(?=[-_.]|$)")
_MAX_SHARD_BYTES = 4 << 30
# a compressed input inflating past this many bytes at more than this ratio is a bomb, not
# digits (MNIST's arrays compress about 5x, its PNGs about 1x; a gigabyte of zeros, about 1000x)
BOMB_BYTES, BOMB_RATIO = 64 << 20, 100
MAX_CSV_LINE = 1 << 16  # characters; a row of a label and 784 pixels is at most about 4,000


@dataclass
class Samples:
    """One split as read: ``images`` uint8, decoded (``(N, 28, 28)``) or an array for
    :func:`pictures.conform_array`; ``labels`` integers ``(N,)`` or ``(N, K)``, None when the
    input has none; ``where`` the input it came from and ``name(i)`` how an error names
    sample ``i`` in it."""

    images: np.ndarray
    labels: np.ndarray | None
    where: str
    name: Callable[[int], str] = field(default=lambda i: f"sample {i}")


@dataclass
class InputPart:
    """A file (or, for an image folder, a tree) a split is read from: ``shown`` is its name
    relative to the input, as the manifest records it; ``data`` its bytes once fetched."""

    split: str
    path: Path | str
    shown: str
    data: bytes | None = None


def split_of(name: str) -> str | None:
    """The split a file or folder name says: ``mnist-train.arrow`` -> "train"."""
    m = SPLIT_WORD.search(Path(name).name.lower())
    return m.group(1) if m else None


def detect(path) -> str:
    """The kind of input at ``path``, where that is unambiguous."""
    if not isinstance(path, (str, Path)):
        if hasattr(path, "with_format") or hasattr(path, "column_names"):
            return "hf"  # a datasets.Dataset or DatasetDict
        raise FastMNISTError(f"cannot tell what kind of input {type(path).__name__} is; "
                             "pass arrays to convert_arrays")
    text = str(path)
    if re.match(r"[a-zA-Z][\w+.-]*://", text) or "{" in text or text.endswith((".tar", ".tar.gz", ".tgz")):
        return "wds"
    p = Path(path)
    by_suffix = {".npz": "npz", ".csv": "csv", ".parquet": "hf", ".arrow": "hf"}
    if p.is_file():
        if p.suffix.lower() in by_suffix:
            return by_suffix[p.suffix.lower()]
        raise FastMNISTError(f"{p}: cannot tell what kind of input this is from its name; "
                             f"pass --from ({', '.join(INPUT_KINDS)})")
    if not p.is_dir():
        raise FastMNISTError(f"{p}: no such file or directory")
    found = set()
    for f in p.rglob("*"):
        suffix = f.suffix.lower()
        if "ubyte" in f.name:
            found.add("idx")
        elif suffix in (".parquet", ".arrow"):
            found.add("hf")
        elif suffix in IMAGE_EXTENSIONS:
            found.add("images")
        elif suffix == ".tar":
            found.add("wds")
        if len(found) > 1:
            break
    if len(found) != 1:
        if not found:
            raise FastMNISTError(f"{p}: no raw IDX files, parquet/Arrow files, images or tar shards in it "
                                 "(a .npz or .csv file is given itself, not its folder)")
        raise FastMNISTError(f"{p}: holds {' and '.join(sorted(found))}; "
                             f"pass --from ({', '.join(INPUT_KINDS)})")
    return found.pop()


class Reader:
    """Base of the readers: ``files()`` the input's parts, ``read()`` its splits.
    ``num_classes``/``classes``: what the input itself declares (None: not declared)."""

    num_classes: int | None = None
    classes: list[str] | None = None
    decodes = True  # its images are encoded files (read() updates a progress bar as it decodes them)

    def __init__(self, path, split: str | None, image_key: str | None, label_key: str | None):
        self.path, self.split, self.image_key, self.label_key = path, split, image_key, label_key

    def files(self) -> list[InputPart]:
        """The input's parts, found once."""
        if not hasattr(self, "_parts_found"):
            self._parts_found = self._find()
        return self._parts_found

    def _find(self) -> list[InputPart]:
        raise NotImplementedError

    def fetch(self, part: InputPart) -> bytes | None:
        """The bytes of a part that is not a local file or folder (None: read it from disk)."""
        return None

    def read(self, progress=None, grayscale=False, resize=False) -> dict[str, Samples]:
        raise NotImplementedError

    def split_for(self, name: str, default: str = "train") -> str:
        return self.split or split_of(name) or default


def walked(folder: Path) -> list[Path]:
    """Every file under ``folder``, in torchvision ``ImageFolder``'s order: ``os.walk``
    following links, its folders sorted by path, each one's files by name. A link that leads
    back to a folder it is in is refused (``os.walk`` would go round it until the path is too
    long)."""
    folder, found = Path(folder), []
    for root, _dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if any(os.path.realpath(up) == real for up in Path(root).parents if up.is_relative_to(folder)):
            raise FastMNISTError(f"{root}: a link to a folder it is in (a loop)")
        found.append((root, sorted(names)))
    return [Path(root) / name for root, names in sorted(found) for name in names]


def _listed(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith("."))


class NpzReader(Reader):
    """Keras' ``mnist.npz`` (``x_train``, ``y_test``, ...), MedMNIST's (``train_images``,
    ``val_labels``, ...), or the arrays named by ``image_key``/``label_key`` (one split)."""

    decodes = False
    _IMAGES = re.compile(r"x_([a-z]+)|([a-z]+)_images")

    def _find(self):
        return [InputPart("", Path(self.path), Path(self.path).name)]

    def read(self, progress=None, grayscale=False, resize=False):
        path = Path(self.path)
        with open_regular(path) as f:
            try:
                archive = np.load(io.BytesIO(f.read()), allow_pickle=False)
                names = archive.files
            except Exception as e:
                raise FastMNISTError(f"{path}: not a readable .npz archive "
                                     f"({type(e).__name__}: {e})") from None
            pairs = self._pairs(path, names)
            splits = {}
            for split, (ik, lk) in pairs.items():
                for name in (ik, lk):
                    _check_inflation(archive.zip, name, path)
                try:
                    images, labels = archive[ik], archive[lk]
                except Exception as e:  # pickled objects, damaged members
                    raise FastMNISTError(f"{path}: {ik}/{lk}: unreadable ({type(e).__name__}: {e})") from None
                if len(images) != len(labels):
                    raise FastMNISTError(f"{path}: {ik} has {len(images)} images but {lk} has "
                                         f"{len(labels)} labels")
                splits[split] = Samples(images, labels, f"{path.name}: {ik}/{lk}", lambda i: f"index {i}")
            return splits

    def _pairs(self, path: Path, names: list[str]) -> dict[str, tuple[str, str]]:
        if self.image_key or self.label_key:
            for key in (self.image_key, self.label_key):
                if key not in names:
                    raise FastMNISTError(f"{path}: no array {key!r}; it holds {', '.join(names)}")
            return {self.split_for(path.name): (self.image_key, self.label_key)}
        pairs = {}
        for name in names:
            m = self._IMAGES.fullmatch(name)
            if m:
                split = m.group(1) or m.group(2)
                label = (f"y_{split}" if name.startswith("x_") else f"{split}_labels")
                if label not in names:
                    raise FastMNISTError(f"{path}: images {name!r} but no labels {label!r}")
                if split in pairs:  # Keras' and MedMNIST's names for one split: which is it?
                    raise FastMNISTError(f"{path}: two image arrays for split {split!r} ({pairs[split][0]!r} "
                                         f"and {name!r}): choose one with --image-key and --label-key")
                pairs[split] = (name, label)
        if not pairs:
            raise FastMNISTError(f"{path}: no Keras (x_train, y_train) or MedMNIST (train_images, "
                                 f"train_labels) arrays; it holds {', '.join(names)}: name them "
                                 "with --image-key and --label-key")
        return pairs


class CsvReader(Reader):
    """``label,pixel0..pixel783`` rows (Kaggle's Digit Recognizer), with or without a header;
    the label column is ``label_key`` (a header name or a column number), else the one named
    "label", else the first of 785 columns; 784 columns are pixels only (Kaggle's test.csv),
    a split without labels."""

    decodes = False

    def _find(self):
        return [InputPart("", Path(self.path), Path(self.path).name)]

    def read(self, progress=None, grayscale=False, resize=False):
        path = Path(self.path)
        with open_regular(path) as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines()
        if not any(line.strip() for line in lines):
            raise FastMNISTError(f"{path}: empty (no rows)")
        long = next((i for i, line in enumerate(lines) if len(line) > MAX_CSV_LINE), None)
        if long is not None:  # before splitting it into a list of millions of strings
            raise FastMNISTError(f"{path}: line {long + 1}: {len(lines[long]):,} characters, over the limit "
                                 f"of {MAX_CSV_LINE:,} (a row is a label and 784 pixels)")
        header = bool(lines) and any(c.isalpha() for c in lines[0])
        columns = lines[0].split(",") if lines else []
        label_column = self._label_column(path, columns, header)
        first = 1 if header else 0
        width = len(columns)
        for at in range(first, len(lines)):
            n = lines[at].count(",") + 1
            if n != width:
                raise FastMNISTError(f"{path}: line {at + 1}: {n} columns, expected {width} "
                                     f"(as the first line)")
        if width != 784 + (label_column is not None):
            raise FastMNISTError(f"{path}: {width} columns, expected "
                                 f"{'a label and ' if label_column is not None else ''}784 pixels")
        try:
            table = np.loadtxt(lines[first:], delimiter=",", dtype=np.int64, ndmin=2).reshape(-1, width)
        except ValueError as e:  # numpy counts rows from 0 after the header
            raise FastMNISTError(f"{path}: {e} (rows counted from 0{' after the header' if header else ''})"
                                 ) from None
        pixels = table if label_column is None else np.delete(table, label_column, axis=1)
        bad = (pixels < 0) | (pixels > 255)
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            raise FastMNISTError(f"{path}: line {row + first + 1}: a pixel value outside 0..255 "
                                 f"({pixels[row][bad[row]][0]})")
        labels = None if label_column is None else table[:, label_column]
        return {self.split_for(path.name): Samples(pixels.astype(np.uint8).reshape(-1, 28, 28), labels,
                                                   path.name, lambda i: f"line {i + first + 1}")}

    def _label_column(self, path: Path, columns: list[str], header: bool) -> int | None:
        """The label column's number; None for 784 columns with no label among them."""
        names = [c.strip().strip('"').lower() for c in columns]
        key = self.label_key
        if key is not None:
            if key.isdigit() and int(key) < len(columns):
                return int(key)
            if header and key.lower() in names:
                return names.index(key.lower())
            raise FastMNISTError(f"{path}: no column {key!r}")
        if header and "label" in names:
            return names.index("label")
        if len(columns) == 785 and not header:
            return 0
        if len(columns) == 784:
            return None  # Kaggle's test.csv: pixels only
        raise FastMNISTError(f"{path}: no label column among {len(columns)} columns"
                             f"{' (a header without label)' if header else ''}; name it with --label-key")


class ImageFolderReader(Reader):
    """``root/<class>/<image>`` as torchvision's ``ImageFolder`` reads it (classes sorted by
    name, indexed from 0; each class folder's images found as ``walked`` finds them, in
    subfolders and through links too), or ``root/<split>/<class>/<image>``. Folders whose
    name starts with "." are not classes (ImageFolder would make ``.ipynb_checkpoints`` one)."""

    def _split_dirs(self) -> dict[str, Path]:
        root = Path(self.path)
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subdirs and all(split_of(p.name) == p.name.lower() for p in subdirs):
            return {p.name.lower(): p for p in subdirs}
        return {self.split or "train": root}

    def _find(self):
        return [InputPart(split, d, "." if d == Path(self.path) else d.name)
                for split, d in self._split_dirs().items()]

    def read(self, progress=None, grayscale=False, resize=False):
        dirs = self._split_dirs()
        self.classes = sorted({c.name for d in dirs.values() for c in d.iterdir()
                               if c.is_dir() and not c.name.startswith(".")})
        if not self.classes:
            raise FastMNISTError(f"{self.path}: no class folders (expected <class>/<image>.png)")
        self.num_classes = len(self.classes)
        splits = {}
        for split, d in dirs.items():
            files = [(i, f) for i, c in enumerate(self.classes) if (d / c).is_dir()
                     for f in walked(d / c) if f.name.lower().endswith(FOLDER_EXTENSIONS)]
            if not files:
                raise FastMNISTError(f"{d}: no images ({', '.join(FOLDER_EXTENSIONS)}) in its class folders")
            blobs = []
            for _, f in files:
                with open_regular(f, shown=f.relative_to(self.path)) as fh:
                    blobs.append(fh.read())
            names = [str(f.relative_to(self.path)) for _, f in files]
            images = pictures.decode(blobs, Path(self.path).name, names.__getitem__, grayscale, resize,
                                     progress)
            splits[split] = Samples(images, np.array([i for i, _ in files], np.int64), str(d))
        return splits


class HfReader(Reader):
    """Hugging Face data: parquet files, Arrow files (``save_to_disk`` and the ``datasets``
    cache write them), folders of either, or a ``datasets.Dataset``/``DatasetDict``. The
    image column holds encoded bytes (the ``Image`` feature's ``{bytes, path}``); a
    ``ClassLabel`` label column gives the class count and names."""

    def _parts(self) -> list[tuple[str, Path]]:
        p = Path(self.path)
        found = [p] if p.is_file() else [f for f in _listed(p, "*") if f.suffix in (".parquet", ".arrow")
                                          and not f.name.startswith("cache-")]
        if not found:
            raise FastMNISTError(f"{p}: no .parquet or .arrow files")
        parts = []
        for f in found:
            split = self.split or split_of(f.name) or (split_of(f.parent.name) if f.parent != p else None)
            if split is None and len(found) > 1:
                raise FastMNISTError(f"{f}: cannot tell its split from its name; pass --split")
            parts.append((split or "train", f))
        return parts

    def _find(self):
        if not isinstance(self.path, (str, Path)):
            return []
        base = Path(self.path) if Path(self.path).is_dir() else Path(self.path).parent
        return [InputPart(split, f, str(f.relative_to(base))) for split, f in self._parts()]

    def read(self, progress=None, grayscale=False, resize=False):
        tables = self._tables()
        splits = {}
        for split, named in tables.items():
            where = ", ".join(name for name, _ in named)
            import pyarrow as pa

            try:
                table = pa.concat_tables([t for _, t in named])
            except pa.ArrowInvalid as e:
                raise FastMNISTError(f"{where}: files of one split with different columns ({e})") from None
            image_key, label_key = self._columns(where, table)
            self._declared(table.schema, label_key)
            column = table.column(image_key).combine_chunks()
            if pa.types.is_struct(column.type):
                blobs = column.field("bytes").to_pylist()
            elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
                blobs = column.to_pylist()
            else:
                raise FastMNISTError(f"{where}: column {image_key!r} is {column.type}, expected encoded "
                                     "images (the Image feature's bytes)")
            missing = [i for i, b in enumerate(blobs) if b is None]
            if missing:
                raise FastMNISTError(f"{where}: row {missing[0]}: no image bytes (images stored by path "
                                     "only are not read)")
            labels = table.column(label_key).to_numpy(zero_copy_only=False)
            if labels.dtype == object:  # lists: multi-label rows, all of one length
                labels = _label_rows(table.column(label_key).to_pylist(), where, label_key)
            images = pictures.decode(blobs, where, lambda i: f"row {i}", grayscale, resize, progress)
            splits[split] = Samples(images, labels, where, lambda i: f"row {i}")
        return splits

    def _tables(self) -> dict[str, list]:
        """{split: [(name, pyarrow.Table), ...]} in file order."""
        try:
            import pyarrow.ipc
            import pyarrow.parquet
        except ImportError:
            raise FastMNISTError("reading Hugging Face data needs pyarrow: pip install 'fastmnist[hf]'"
                                 ) from None
        if not isinstance(self.path, (str, Path)):
            return self._from_datasets(self.path)
        out = {}
        for part in self.files():
            try:
                with open_regular(part.path) as f:
                    data = pyarrow.py_buffer(f.read())
                if part.path.suffix == ".parquet":
                    table = pyarrow.parquet.read_table(pyarrow.BufferReader(data))
                else:
                    try:
                        table = pyarrow.ipc.open_stream(data).read_all()
                    except pyarrow.ArrowInvalid:
                        table = pyarrow.ipc.open_file(data).read_all()
            except (pyarrow.ArrowException, OSError) as e:
                raise FastMNISTError(f"{part.shown}: not a readable {part.path.suffix[1:]} file "
                                     f"({type(e).__name__}: {e})") from None
            out.setdefault(part.split, []).append((part.shown, table))
        return out

    def _from_datasets(self, ds) -> dict[str, list]:
        """{split: [(name, table)]} of a ``DatasetDict``, or of a ``Dataset`` (its split: the
        one asked for, else its own, else "train")."""
        parts = ds.items() if hasattr(ds, "keys") else [(self.split or str(ds.split or "train"), ds)]
        return {str(s): [(f"datasets.Dataset[{s}]", d.with_format("arrow")[:])] for s, d in parts}

    def _columns(self, where: str, table) -> tuple[str, str]:
        import pyarrow as pa

        names = table.column_names
        image_key = self.image_key or next(
            (n for n in names if pa.types.is_struct(table.schema.field(n).type)
             and "bytes" in [f.name for f in table.schema.field(n).type]), None)
        label_key = self.label_key or next((n for n in ("label", "labels") if n in names), None)
        for role, key in (("image", image_key), ("label", label_key)):
            if key is None or key not in names:
                raise FastMNISTError(f"{where}: no {role} column{f' {key!r}' if key else ''}; its columns: "
                                     f"{', '.join(names)} (name it with --{role}-key)")
        return image_key, label_key

    def _declared(self, schema, label_key: str) -> None:
        """The class names of a ``ClassLabel`` label column, from the schema's metadata."""
        try:
            meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
            feature = meta.get("info", {}).get("features", {}).get(label_key, {})
        except (ValueError, AttributeError):
            return
        names = feature.get("names") if isinstance(feature, dict) else None
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            self.classes, self.num_classes = names, len(names)


class WdsReader(Reader):
    """WebDataset shards (local files, a folder of them, a brace pattern or URLs): one sample
    per key, its image the member with extension ``image_key`` (default: the first of png,
    jpg, jpeg, pgm, ppm, webp it has) and its class the ``label_key`` member (default
    ``cls``), an integer as text. Samples keep the shards' order."""

    def _find(self):
        from ..remote.transport import expand_urls, is_url

        path = self.path
        if not is_url(str(path)) and "{" not in str(path) and Path(path).is_dir():
            return [InputPart(self.split_for(f.name), f, str(f.relative_to(path)))
                    for f in _listed(Path(path), "*.tar")]
        return [InputPart(self.split_for(u.rsplit("/", 1)[-1]), u, _without_secrets(u))
                for u in expand_urls(str(path))]

    def fetch(self, part: InputPart) -> bytes:
        from ..remote.transport import fetch

        if part.data is None:
            part.data = fetch(str(part.path), limit=_MAX_SHARD_BYTES)
        return part.data

    def read(self, progress=None, grayscale=False, resize=False):
        by_split: dict[str, list] = {}
        for part in self.files():
            by_split.setdefault(part.split, []).append(part)
        splits = {}
        for split, split_parts in by_split.items():
            blobs, arrays, labels, names = [], {}, [], []
            for part in split_parts:
                for key, members in self._samples(part):
                    extension, data = self._image(part, key, members)
                    if extension == "npy":  # fastmnist's own shards, and others that store arrays
                        arrays[len(blobs)] = _npy_image(data, f"{part.shown}: key {key}.npy")
                    blobs.append(data)
                    labels.append(self._label(part, key, members))
                    names.append(f"{part.shown}: key {key}")
            images = _images(blobs, arrays, names, grayscale, resize, progress)
            splits[split] = Samples(images, np.array(labels, np.int64), split)
        return splits

    def _samples(self, part: InputPart):
        """(key, {extension: bytes}) per sample, members grouped by consecutive key, as
        webdataset groups them."""
        key, members = None, {}
        for name, data in tar_members(self.fetch(part), part.shown):
            match = re.fullmatch(r"((?:.*/)?[^./]+)\.([^/]+)", name)
            if match is None:
                continue
            if match.group(1) != key:
                if key is not None:
                    yield key, members
                key, members = match.group(1), {}
            extension = match.group(2).lower()
            if extension in members:  # webdataset refuses it too: which one is the sample's?
                raise FastMNISTError(f"{part.shown}: key {key}: two {extension} members")
            members[extension] = data
        if key is not None:
            yield key, members

    def _image(self, part, key, members) -> tuple[str, bytes]:
        """(extension, bytes) of the sample's image member."""
        wanted = [self.image_key] if self.image_key else ["png", "jpg", "jpeg", "pgm", "ppm", "webp", "npy"]
        found = next((e for e in wanted if e in members), None)
        if found is None:
            raise FastMNISTError(f"{part.shown}: key {key}: no {' or '.join(wanted)} member "
                                 f"(it has {', '.join(sorted(members)) or 'none'})")
        return found, members[found]

    def _label(self, part, key, members) -> int:
        ext = self.label_key or "cls"
        if ext not in members:
            raise FastMNISTError(f"{part.shown}: key {key}: no {ext} member "
                                 f"(it has {', '.join(sorted(members))})")
        text = members[ext].decode("ascii", errors="replace").strip()
        if not re.fullmatch(r"-?\d{1,9}", text):
            raise FastMNISTError(f"{part.shown}: key {key}: {ext} is {text[:20]!r}, expected an integer")
        return int(text)


def _check_inflation(archive, name: str, path: Path) -> None:
    """Refuse, before reading it, an .npz member ``name`` (of the ``zipfile.ZipFile``
    ``archive``) that would inflate past ``BOMB_BYTES`` at more than ``BOMB_RATIO``
    times its size, or whose .npy header claims more bytes than the member holds (numpy
    would allocate the header's shape first)."""
    member = archive.getinfo(f"{name}.npy")
    size, packed = member.file_size, max(member.compress_size, 1)
    if size > BOMB_BYTES and size > BOMB_RATIO * packed:
        raise FastMNISTError(f"{path}: {name} would inflate from {packed:,} to {size:,} bytes ("
                             f"{size // packed:,}x; the limit is {BOMB_RATIO}x past "
                             f"{BOMB_BYTES >> 20} MiB): refused unread")
    try:
        with archive.open(member) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError) as e:
        raise FastMNISTError(f"{path}: {name}: not a readable .npy member ({e})") from None
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed > size:
        raise FastMNISTError(f"{path}: {name}: its header claims {claimed:,} bytes ({dtype} {list(shape)}), "
                             f"the member holds {size:,}")


def _label_rows(rows: list, where: str, column: str) -> np.ndarray:
    """``(N, K)`` labels from a column of lists, each ``K`` integers; else an error naming the row."""
    width = len(rows[0]) if rows and isinstance(rows[0], list) else None
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width or any(not isinstance(v, int) for v in row):
            raise FastMNISTError(f"{where}: row {i}: column {column!r} holds {str(row)[:40]}, expected a "
                                 f"list of {width if width else 'some'} integers as in row 0")
    try:
        return np.array(rows, np.int64)
    except OverflowError:
        raise FastMNISTError(f"{where}: column {column!r}: a label beyond int64") from None


def _images(blobs: list[bytes], arrays: dict, names: list[str], grayscale: bool, resize: bool, progress
            ) -> np.ndarray:
    """uint8 ``(len(blobs), 28, 28)``: ``arrays[i]`` where the sample's member was a ``.npy``
    array (all of one shape and dtype), else ``blobs[i]`` decoded; ``names[i]`` in errors."""
    images = np.empty((len(blobs), 28, 28), np.uint8)
    if arrays:
        first = next(iter(arrays))
        like = (arrays[first].shape, arrays[first].dtype)
        for i, image in arrays.items():
            if (image.shape, image.dtype) != like:
                raise FastMNISTError(f"{names[i]}.npy: {image.dtype} {image.shape}, but {names[first]}.npy "
                                     f"is {like[1]} {like[0]}")
        stacked = np.stack(list(arrays.values()))
        images[list(arrays)] = pictures.conform_array(stacked, f"{names[first]}.npy, ...", grayscale, resize)
        if progress is not None:
            progress.update(len(arrays))
    encoded = [i for i in range(len(blobs)) if i not in arrays]
    if encoded:
        images[encoded] = pictures.decode([blobs[i] for i in encoded], "", lambda i: names[encoded[i]],
                                          grayscale, resize, progress)
    return images


def _npy_image(data: bytes, where: str) -> np.ndarray:
    """One image from a ``.npy`` member (as ``np.save`` writes it, never a pickle): uint8
    ``(28, 28)``, ``(1, 28, 28)`` or ``(28, 28, 1)``, or ``(H, W[, C])`` for ``conform_array``."""
    try:
        image = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FastMNISTError(f"{where}: not a readable .npy array ({e})") from None
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim not in (2, 3):
        raise FastMNISTError(f"{where}: an array of shape {image.shape}, expected one image (28, 28)")
    return image


def tar_members(data: bytes, shown: str):
    """(name, bytes) of each regular file in a tar archive (gzip-compressed or not), read
    in place: ustar, GNU long names and pax ``path`` records; every header's checksum is
    checked and every size must fit the archive. Faster than ``tarfile`` by 5x on
    MNIST-sized members, and it never writes a file."""
    if data[:2] == b"\x1f\x8b":
        limit = min(_MAX_SHARD_BYTES, max(BOMB_BYTES, BOMB_RATIO * len(data)))
        unzip = zlib.decompressobj(wbits=31)
        try:
            data = unzip.decompress(data, limit)
        except zlib.error as e:
            raise FastMNISTError(f"{shown}: not a readable tar.gz archive ({e})") from None
        if unzip.unconsumed_tail or (len(data) == limit and not unzip.eof):
            raise FastMNISTError(f"{shown}: more than {limit:,} bytes once decompressed (the limit: "
                                 f"{BOMB_RATIO}x its size past {BOMB_BYTES >> 20} MiB, at most "
                                 f"{_MAX_SHARD_BYTES >> 30} GiB): refused")
    at, long_name, pax, pax_global = 0, None, {}, {}
    while at + tarfile.BLOCKSIZE <= len(data):
        header = data[at:at + tarfile.BLOCKSIZE]
        if not header.strip(b"\0"):
            return  # the end-of-archive blocks
        size, stored = _octal(header[124:136]), _octal(header[148:156])
        if stored is None or stored != sum(header[:148]) + 8 * 32 + sum(header[156:]) or size is None:
            raise FastMNISTError(f"{shown}: not a readable tar archive (a damaged member header at "
                                 f"byte {at})")
        kind = header[156:157]
        records = {**pax_global, **pax} if kind not in (b"x", b"g") else {}
        if b"size" in records:  # a pax size replaces the header's, as tarfile takes it
            size = _pax_number(records[b"size"], shown, at)
        start = at + tarfile.BLOCKSIZE
        if start + size > len(data):
            raise FastMNISTError(f"{shown}: not a readable tar archive (cut short: a member of {size} "
                                 f"bytes at byte {start})")
        payload = data[start:start + size]
        at = start + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if kind == b"x":  # pax: records for the next member (its path, its size)
            pax = _pax_records(payload, shown, start)
            continue
        if kind == b"g":  # pax: records for every member after it
            pax_global.update(_pax_records(payload, shown, start))
            continue
        if kind == b"L":  # GNU: the next member's name
            long_name = payload.rstrip(b"\0")
            continue
        if kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0")[0]
            prefix = header[345:500].split(b"\0")[0] if header[257:262] == b"ustar" else b""
            name = records.get(b"path") or long_name or (prefix + b"/" + name if prefix else name)
            yield name.decode("utf-8", errors="replace"), payload
        long_name, pax = None, {}  # directories, links, devices: no data of a sample
    raise FastMNISTError(f"{shown}: not a readable tar archive (no end-of-archive blocks)")


def _pax_records(payload: bytes, shown: str, at: int) -> dict[bytes, bytes]:
    """A pax extended header's ``"LENGTH key=value\\n"`` records, as a dict."""
    records, pos = {}, 0
    while pos < len(payload) and payload[pos:].strip(b"\0"):
        length, _, rest = payload[pos:pos + 20].partition(b" ")
        if not length.isdigit() or not 0 < int(length) <= len(payload) - pos or \
                payload[pos + int(length) - 1:pos + int(length)] != b"\n" or b"=" not in rest:
            raise FastMNISTError(f"{shown}: not a readable tar archive (a damaged pax record at byte "
                                 f"{at + pos})")
        key, _, value = payload[pos + len(length) + 1:pos + int(length) - 1].partition(b"=")
        records[key] = value
        pos += int(length)
    return records


def _pax_number(value: bytes, shown: str, at: int) -> int:
    if not value.isdigit():
        raise FastMNISTError(f"{shown}: not a readable tar archive (a pax size {value[:20]!r} at byte {at})")
    return int(value)


def _octal(field: bytes) -> int | None:
    """A tar header's octal number (NUL- or space-terminated), None if it is not one."""
    text = field.split(b"\0")[0].strip()
    return int(text, 8) if text and all(48 <= c <= 55 for c in text) else None if text else 0


def _without_secrets(url: str) -> str:
    """A URL as the manifest may record it: no user, password, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


READERS = {"hf": HfReader, "npz": NpzReader, "csv": CsvReader, "images": ImageFolderReader, "wds": WdsReader}
