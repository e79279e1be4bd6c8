"""Read and validate IDX files (the MNIST raw format), plain or gzip-compressed.

Every problem raises :class:`FastMNISTError` naming the file, what was expected and what
was found. A header is checked against the file's size before any large allocation.
"""

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import FastMNISTError

IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
IMAGE_SIDE = 28
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data by more than this
_CHUNK = 1 << 20


def read_images(path: Path) -> np.ndarray:
    """Images of an IDX3 file as a uint8 array ``(N, 1, 28, 28)``."""
    data, dims = _read(Path(path), IMAGES_MAGIC, 3)
    n, rows, cols = dims
    if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
        raise FastMNISTError(
            f"{path}: image size: expected {IMAGE_SIDE}x{IMAGE_SIDE}, found {rows}x{cols}"
        )
    return data.reshape(n, 1, rows, cols)


def read_labels(path: Path, num_classes: int = 10) -> np.ndarray:
    """Labels of an IDX1 file as a uint8 array ``(N,)``, each checked to be < ``num_classes``."""
    data, _ = _read(Path(path), LABELS_MAGIC, 1)
    if data.size and int(data.max()) >= num_classes:
        bad = int(np.argmax(data >= num_classes))
        raise FastMNISTError(
            f"{path}: label {bad}: expected a class in 0..{num_classes - 1}, found {data[bad]}"
        )
    return data


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write uint8 labels ``(N,)`` or images ``(N, 28, 28)`` as an IDX file, gzip-compressed
    (reproducibly: no timestamp) when the name ends in ``.gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = LABELS_MAGIC if array.ndim == 1 else IMAGES_MAGIC
    data = struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, 1, mtime=0) if path.suffix == ".gz" else data)
    return path


def _read(path: Path, magic: int, ndim: int) -> tuple[np.ndarray, tuple[int, ...]]:
    header_len = 4 + 4 * ndim
    try:
        file_size = path.stat().st_size
        compressed = path.suffix == ".gz"
        opener = gzip.open if compressed else open
        with opener(path, "rb") as f:
            header = f.read(header_len)
            if len(header) >= 4 and (found := struct.unpack(">i", header[:4])[0]) != magic:
                raise FastMNISTError(f"{path}: bad magic number: expected {magic}, found {found}")
            if len(header) < header_len:
                raise FastMNISTError(
                    f"{path}: truncated header: expected {header_len} bytes, found {len(header)}"
                )
            dims = struct.unpack(f">{ndim}i", header[4:])
            if any(d < 0 for d in dims):
                raise FastMNISTError(f"{path}: negative dimension in header: {list(dims)}")
            body_len = int(np.prod(dims, dtype=np.int64))
            # The header's claim is checked against what the file can hold before reading.
            limit = file_size * _MAX_DEFLATE_RATIO if compressed else file_size - header_len
            if body_len > limit:
                raise FastMNISTError(
                    f"{path}: header claims {list(dims)} = {body_len} bytes of data, "
                    f"more than the {file_size}-byte file can hold"
                )
            body = _read_at_most(f, body_len + 1)
    except FileNotFoundError:
        raise FastMNISTError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise FastMNISTError(f"{path}: cannot read: {e}") from None
    if len(body) != body_len:
        raise FastMNISTError(
            f"{path}: data length: header {list(dims)} expects {body_len} bytes, found {len(body)}"
        )
    return np.frombuffer(body, dtype=np.uint8), tuple(dims)


def _read_at_most(f, n: int) -> bytearray:
    """Read up to ``n`` bytes in chunks, so memory grows only with data actually present."""
    out = bytearray()
    while len(out) < n:
        chunk = f.read(min(_CHUNK, n - len(out)))
        if not chunk:
            break
        out += chunk
    return out
