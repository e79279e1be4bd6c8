"""Read and validate IDX files (the MNIST raw format), plain or gzip/xz-compressed, in chunks.

Every problem raises :class:`FastMNISTError` naming the file, what was expected and what
was found. A header is checked against the file's size before any large allocation, and
:class:`IdxReader` reads the body a chunk at a time, so memory stays flat whatever its size.
"""

import gzip
import lzma
import math
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FastMNISTError
from .files import open_regular

IMAGE_SIDE = 28
# how much each can expand data: deflate at most 1032x; xz reached 6,843x on zeros
_MAX_RATIO = {".gz": 1032, ".xz": 7000}
XZ_MEMORY_LIMIT = 128 << 20  # xz -9 needs 65 MiB to decode; a 60-byte file can ask for 1.5 GiB
_TYPES = {0x08: np.dtype(">u1"), 0x0C: np.dtype(">i4")}  # IDX type codes: unsigned byte, int32


@dataclass(frozen=True)
class IdxKind:
    """What a file must hold: its magic number (type code << 8 | dimensions) and row shape."""

    magic: int
    row_shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return _TYPES[self.magic >> 8]


IMAGES = IdxKind(0x0803, (IMAGE_SIDE, IMAGE_SIDE))  # uint8 (N, 28, 28)
LABELS = IdxKind(0x0801, ())  # uint8 (N,)
QMNIST_LABELS = IdxKind(0x0C02, (8,))  # int32 (N, 8), QMNIST's "labels-idx2-int"


def label_kind(columns: int) -> IdxKind:
    """A labels file's kind: uint8 classes (``columns`` 0) or QMNIST's 8 int32 columns."""
    return QMNIST_LABELS if columns else LABELS


class IdxReader:
    """An IDX file of ``kind`` with its header read and checked (``count`` rows); read its
    rows with :meth:`chunks`. Use as a context manager."""

    def __init__(self, path: Path, kind: IdxKind):
        self.path, self.kind = Path(path), kind
        ndim = 1 + len(kind.row_shape)
        header_len = 4 + 4 * ndim
        try:
            self._raw = open_regular(self.path)
            file_size = os.fstat(self._raw.fileno()).st_size
            self._file = {".gz": lambda f: gzip.GzipFile(fileobj=f), ".xz": _XzReader}.get(
                self.path.suffix, lambda f: f)(self._raw)
            header = self._file.read(header_len)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise self._unreadable(e) from None
        if len(header) >= 4 and (found := struct.unpack(">i", header[:4])[0]) != kind.magic:
            self.close()
            raise FastMNISTError(f"{path}: bad magic number: expected {kind.magic}, found {found}")
        if len(header) < header_len:
            self.close()
            raise FastMNISTError(f"{path}: truncated header: expected {header_len} bytes, "
                                 f"found {len(header)}")
        self.dims = struct.unpack(f">{ndim}i", header[4:])
        problem = None
        if any(d < 0 for d in self.dims):
            problem = f"negative dimension in header: {list(self.dims)}"
        elif kind == IMAGES and tuple(self.dims[1:]) != kind.row_shape:
            problem = f"image size: expected {IMAGE_SIDE}x{IMAGE_SIDE}, found {self.dims[1]}x{self.dims[2]}"
        elif tuple(self.dims[1:]) != kind.row_shape:
            problem = f"row shape: expected {list(kind.row_shape)}, found {list(self.dims[1:])}"
        self.row_bytes = math.prod(kind.row_shape) * kind.dtype.itemsize
        self.body_len = self.dims[0] * self.row_bytes
        compressed = self.path.suffix in _MAX_RATIO
        # The header's claim is checked against what the file can hold before reading.
        limit = file_size * _MAX_RATIO[self.path.suffix] if compressed else file_size - header_len
        if problem is None and self.body_len > limit:
            problem = (f"header claims {list(self.dims)} = {self.body_len} bytes of data, "
                       f"more than the {file_size}-byte file can hold")
        if problem is None and not compressed and self.body_len != limit:
            problem = (f"data length: header {list(self.dims)} expects {self.body_len} bytes, "
                       f"found {limit}")
        if problem is not None:
            self.close()
            raise FastMNISTError(f"{path}: {problem}")

    @property
    def count(self) -> int:
        return self.dims[0]

    def chunks(self, rows: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Rows ``start .. stop - 1`` (native uint8 or int32 arrays ``(r, *row_shape)``,
        ``r <= rows``); the whole body is read and checked, rows outside the range skipped."""
        stop = self.count if stop is None else min(stop, self.count)
        native = self.kind.dtype.newbyteorder("=")
        position = 0
        while position < self.count:
            n = min(rows, self.count - position)
            want = n * self.row_bytes
            data = self._read(want)
            if len(data) != want:
                raise FastMNISTError(f"{self.path}: data length: header {list(self.dims)} expects "
                                     f"{self.body_len} bytes, found {position * self.row_bytes + len(data)}")
            lo, hi = max(start, position) - position, min(stop, position + n) - position
            if lo < hi:
                kept = np.frombuffer(data, self.kind.dtype, offset=lo * self.row_bytes)
                yield kept.reshape(-1, *self.kind.row_shape)[:hi - lo].astype(native, copy=False)
            position += n
        if self._read(1):
            raise FastMNISTError(f"{self.path}: data length: header {list(self.dims)} expects "
                                 f"{self.body_len} bytes, found more")

    def _read(self, n: int) -> bytes:
        try:
            return self._file.read(n)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # gzip.BadGzipFile is an OSError
            raise self._unreadable(e) from None

    def _unreadable(self, e: Exception) -> FastMNISTError:
        self.close()
        return FastMNISTError(f"{self.path}: cannot read: {e}")

    def close(self) -> None:
        for f in (getattr(self, "_file", None), getattr(self, "_raw", None)):
            if f is not None:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _XzReader:
    """An ``.xz`` file's decompressed bytes, read with the decoder's memory bounded by
    ``XZ_MEMORY_LIMIT`` (``lzma.open`` takes no limit, and a hostile header sets the
    dictionary size the decoder allocates). One stream; data after it is an error."""

    def __init__(self, raw):
        self._raw = raw
        self._decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMORY_LIMIT)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        out = bytearray()
        while len(out) < n and not self._decoder.eof:
            data = b""
            if self._decoder.needs_input:
                data = self._raw.read(1 << 16)
                if not data:
                    raise EOFError("compressed data ended before the end-of-stream marker")
            out += self._decoder.decompress(data, max_length=n - len(out))
        if self._decoder.eof and (self._decoder.unused_data or self._raw.read(1)):
            raise lzma.LZMAError("data after the end of the xz stream")
        return bytes(out)

    def close(self) -> None:
        self._raw.close()


def read_images(path: Path) -> np.ndarray:
    """All images of an IDX3 file as a uint8 array ``(N, 1, 28, 28)``."""
    with IdxReader(path, IMAGES) as f:
        return _read_all(f).reshape(f.count, 1, IMAGE_SIDE, IMAGE_SIDE)


def read_labels(path: Path, num_classes: int = 10) -> np.ndarray:
    """All labels of an IDX1 file as a uint8 array ``(N,)``, each checked to be < ``num_classes``."""
    with IdxReader(path, LABELS) as f:
        labels = _read_all(f)
    check_classes(path, labels, num_classes)
    return labels


def check_classes(path: Path, classes: np.ndarray, num_classes: int, first: int = 0) -> None:
    """Raise naming ``path`` and the label unless every entry of ``classes`` (labels
    ``first, first + 1, ...``) is in ``0 .. num_classes - 1``."""
    bad = (classes < 0) | (classes >= num_classes)
    if bad.any():
        at = int(np.argmax(bad))
        raise FastMNISTError(f"{path}: label {first + at}: expected a class in 0..{num_classes - 1}, "
                             f"found {classes[at]}")


def _read_all(f: IdxReader) -> np.ndarray:
    out = np.empty((f.count, *f.kind.row_shape), f.kind.dtype.newbyteorder("="))
    at = 0
    for chunk in f.chunks(1 << 12):
        out[at:at + len(chunk)] = chunk
        at += len(chunk)
    return out


class IdxWriter:
    """A new IDX file at ``path`` of ``count`` rows of ``kind``, written a chunk of rows at a
    time (:meth:`write`), compressed (reproducibly: no name, no timestamp) when the name ends
    in ``.gz`` or ``.xz``. Use as a context manager."""

    def __init__(self, path: Path, kind: IdxKind, count: int):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.kind, self._raw = kind, open(path, "wb")
        if path.suffix == ".gz":
            self._file = gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=self._raw, mtime=0)
        elif path.suffix == ".xz":
            self._file = lzma.open(self._raw, "wb", preset=0)
        else:
            self._file = self._raw
        self._file.write(struct.pack(f">{2 + len(kind.row_shape)}i", kind.magic, count, *kind.row_shape))

    def write(self, rows: np.ndarray) -> None:
        """Append rows ``(r, *kind.row_shape)`` (converted to the file's type)."""
        self._file.write(np.ascontiguousarray(rows, self.kind.dtype).reshape(-1).view(np.uint8))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._file is not self._raw:
            self._file.close()
        self._raw.close()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write uint8 labels ``(N,)``, uint8 images ``(N, 28, 28)`` or int32 QMNIST labels
    ``(N, 8)`` as an IDX file (see :class:`IdxWriter`); returns ``path``."""
    kind = IMAGES if array.ndim == 3 else QMNIST_LABELS if array.ndim == 2 else LABELS
    with IdxWriter(path, kind, len(array)) as f:
        f.write(array)
    return Path(path)
