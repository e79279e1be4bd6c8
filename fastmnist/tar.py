"""WebDataset tar shards in one fixed layout, written and read as whole arrays of bytes.

Each sample is two tar members, in the order webdataset's ``TarWriter`` writes them (sorted
by extension): ``{key}.cls``, the label as one ASCII digit, and ``{key}.npy``, the uint8
``(28, 28)`` image as ``np.save`` writes it. The key is the sample's 8-digit index in its
split, every modification time is 0, and every member has the same size, so sample ``i``
of a shard is the ``RECORD`` bytes at ``i * RECORD``, equal to every other record but for
its key, checksums, label digit and pixels. The bytes are those ``TarWriter(f, mtime=0)``
writes for the same samples (a test proves it), so stock webdataset and ``tarfile`` read
the shards; fastmnist writes and checks them without a per-sample Python loop.
"""

import io
import tarfile

import numpy as np

from .errors import FastMNISTError

BLOCK = 512  # tar's unit: every header and every member's data fill whole blocks
KEY_DIGITS = 8  # the key: the sample's index in its split, zero-padded
SIDE = 28
PIXELS = SIDE * SIDE

# Fields of a tar member header (POSIX ustar), as byte ranges of its block.
NAME = slice(0, KEY_DIGITS)  # the key; the extension follows it
CHECKSUM = slice(148, 156)  # six octal digits, NUL, space
CHECKSUM_DIGITS = 6
END_OF_ARCHIVE = 2 * BLOCK  # zero blocks after the last member
ARCHIVE_UNIT = tarfile.RECORDSIZE  # 10240: tarfile pads a closed archive to a multiple of this


def _npy_header() -> bytes:
    """What ``np.save`` writes before the 784 pixels of a uint8 ``(28, 28)`` image."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((SIDE, SIDE), np.uint8))
    return buf.getvalue()[:-PIXELS]


NPY_HEADER = _npy_header()  # 128 bytes: np.save pads its header to a multiple of 64
NPY_SIZE = len(NPY_HEADER) + PIXELS
_NPY_BLOCKS = -(-NPY_SIZE // BLOCK)

# Offsets inside one sample's record.
CLS_MEMBER = 0  # header block of {key}.cls
LABEL = CLS_MEMBER + BLOCK  # its one data block: the digit, then zeros
NPY_MEMBER = LABEL + BLOCK  # header block of {key}.npy
IMAGE = NPY_MEMBER + BLOCK + len(NPY_HEADER)  # the pixels, after the .npy header
RECORD = NPY_MEMBER + BLOCK + _NPY_BLOCKS * BLOCK  # 2560 bytes per sample


def _member_header(extension: str, size: int) -> np.ndarray:
    """uint8 ``(512,)``: the header TarWriter writes for key 00000000, its checksum field
    blank (eight spaces, as the checksum is computed)."""
    info = tarfile.TarInfo(f"{0:0{KEY_DIGITS}d}.{extension}")
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
    header = np.frombuffer(info.tobuf(tarfile.PAX_FORMAT), np.uint8).copy()
    header[CHECKSUM] = ord(" ")
    return header


def _template() -> np.ndarray:
    """uint8 ``(RECORD,)``: the record of sample 0 with label 0, black pixels and blank checksums."""
    record = np.zeros(RECORD, np.uint8)
    record[CLS_MEMBER:CLS_MEMBER + BLOCK] = _member_header("cls", 1)
    record[LABEL] = ord("0")
    record[NPY_MEMBER:NPY_MEMBER + BLOCK] = _member_header("npy", NPY_SIZE)
    record[NPY_MEMBER + BLOCK:IMAGE] = np.frombuffer(NPY_HEADER, np.uint8)
    return record


_TEMPLATE = _template()
_HEADERS = (CLS_MEMBER, NPY_MEMBER)
_BLANK_SUMS = [int(_TEMPLATE[h:h + BLOCK].sum(dtype=np.int64)) for h in _HEADERS]
# The columns of a record before its pixels that differ between samples: keys, checksums, label.
_VARYING = np.array([LABEL, *(h + c for h in _HEADERS for c in (
    *range(NAME.start, NAME.stop), *range(CHECKSUM.start, CHECKSUM.start + CHECKSUM_DIGITS + 1)))])
_HEAD_WORDS = _TEMPLATE[:IMAGE].view(np.uint64)  # IMAGE is a multiple of 8


def _keys_and_checksums(first: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 ASCII ``(n, KEY_DIGITS)`` keys of samples ``first, first + 1, ...`` and, for each
    member header, their ``(n, CHECKSUM_DIGITS)`` octal checksums."""
    keys = first + np.arange(n, dtype=np.int64)
    digits = ((keys[:, None] // 10 ** np.arange(KEY_DIGITS - 1, -1, -1)) % 10 + ord("0")).astype(np.uint8)
    key_sum = (digits - ord("0")).sum(1, dtype=np.int64)  # the template's key is "00000000"
    octal = 8 ** np.arange(CHECKSUM_DIGITS - 1, -1, -1)
    return digits, [((blank + key_sum)[:, None] // octal % 8 + ord("0")).astype(np.uint8)
                    for blank in _BLANK_SUMS]


def records(first: int, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 ``(n, RECORD)``: the records of samples ``first, first + 1, ...`` with uint8
    images ``(n, 1, 28, 28)`` and labels ``(n,)`` in 0..9."""
    n = len(labels)
    out = np.empty((n, RECORD), np.uint8)
    out[:] = _TEMPLATE
    out[:, LABEL] = labels + ord("0")
    out[:, IMAGE:IMAGE + PIXELS] = images.reshape(n, PIXELS)
    digits, checksums = _keys_and_checksums(first, n)
    for header, checksum in zip(_HEADERS, checksums, strict=True):
        out[:, header + NAME.start:header + NAME.stop] = digits
        out[:, header + CHECKSUM.start:header + CHECKSUM.start + CHECKSUM_DIGITS] = checksum
        out[:, header + CHECKSUM.start + CHECKSUM_DIGITS] = 0
    return out


def archive_size(count: int) -> int:
    """Bytes of a shard of ``count`` samples: records, end-of-archive blocks, padding."""
    return -(-(count * RECORD + END_OF_ARCHIVE) // ARCHIVE_UNIT) * ARCHIVE_UNIT


def shard_chunks(first: int, images: np.ndarray, labels: np.ndarray, chunk: int = 1024):
    """The bytes of a shard of samples ``first, first + 1, ...`` (uint8 images ``(n, 1, 28,
    28)``, labels ``(n,)``), as uint8 arrays to write one after the other."""
    for start in range(0, len(labels), chunk):
        yield records(first + start, images[start:start + chunk], labels[start:start + chunk])
    yield np.zeros(archive_size(len(labels)) - len(labels) * RECORD, np.uint8)


def decode_shard(data, first: int, count: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Check a shard's bytes against the layout (keys ``first..first + count - 1``) and
    return its uint8 images ``(count, 1, 28, 28)`` and int64 labels ``(count,)``, both
    copies (so ``data`` can be freed); errors name the shard and the sample."""
    a = np.frombuffer(data, np.uint8)
    if len(a) != archive_size(count):
        raise FastMNISTError(f"{name}: {len(a)} bytes, {count} samples make {archive_size(count)}")
    rows = a[:count * RECORD].reshape(count, RECORD)
    digits = rows[:, LABEL]
    bad_label = (digits < ord("0")) | (digits > ord("9"))
    if bad_label.any():
        raise FastMNISTError(f"{name}: sample {int(np.argmax(bad_label))}: the .cls entry is "
                             "not a single digit (corrupted)")
    labels = (digits - ord("0")).astype(np.int64)
    images = rows[:, IMAGE:IMAGE + PIXELS].reshape(count, 1, SIDE, SIDE).copy()
    if not _in_layout(rows, first):  # find and name the first difference
        expected = records(first, images, labels)
        wrong = int(np.argmax((rows != expected).any(1)))
        column = int(np.argmax(rows[wrong] != expected[wrong]))
        part = ("the .cls member header" if column < LABEL else "the .cls data" if column < NPY_MEMBER
                else "the .npy member header" if column < NPY_MEMBER + BLOCK else "the .npy data")
        raise FastMNISTError(f"{name}: sample {wrong}: unexpected bytes in {part} at offset "
                             f"{column} (corrupted, or not in fastmnist's layout)")
    if a[count * RECORD:].any():
        raise FastMNISTError(f"{name}: bytes after the last of its {count} samples (corrupted)")
    return images, labels


def _in_layout(rows: np.ndarray, first: int) -> bool:
    """Whether every byte of the records ``rows`` (uint8 ``(n, RECORD)``) but their label
    digits and pixels is the layout's for samples ``first, first + 1, ...``: the keys and
    checksums compared on their own, the rest against the template 8 bytes at a time."""
    head = rows[:, :IMAGE].copy()
    digits, checksums = _keys_and_checksums(first, len(rows))
    for header, checksum in zip(_HEADERS, checksums, strict=True):
        at = header + CHECKSUM.start
        if not (np.array_equal(head[:, header + NAME.start:header + NAME.stop], digits)
                and np.array_equal(head[:, at:at + CHECKSUM_DIGITS], checksum)
                and not head[:, at + CHECKSUM_DIGITS].any()):
            return False
    head[:, _VARYING] = _TEMPLATE[_VARYING]  # checked above (the label digit by the caller)
    return bool((head.view(np.uint64) == _HEAD_WORDS).all()) and not rows[:, IMAGE + PIXELS:].any()
