"""WebDataset tar shards in one fixed layout, written and read as whole arrays of bytes.

Each sample is two tar members, in the order webdataset's ``TarWriter`` writes them (sorted
by extension): ``{key}.cls``, the label in ASCII decimal (1 to 3 digits, as ``str(label)``),
and ``{key}.npy``, the uint8 ``(28, 28)`` image as ``np.save`` writes it. The key is the
sample's 8-digit index in its split and every modification time is 0; every member fills
the same number of blocks, so sample ``i`` of a shard is the ``RECORD`` bytes at
``i * RECORD``, equal to every other record but for its key, checksums, label (its digits
and the .cls size) and pixels. The bytes are those ``TarWriter(f, mtime=0)``
writes for the same samples (a test proves it), so stock webdataset and ``tarfile`` read
the shards; fastmnist writes and checks them without a per-sample Python loop.
"""

import hashlib
import io
import tarfile

import numpy as np

from ..errors import FastMNISTError
from .idx import IMAGE_SIDE

BLOCK = 512  # tar's unit: every header and every member's data fill whole blocks
KEY_DIGITS = 8  # the key: the sample's index in its split, zero-padded
PIXELS = IMAGE_SIDE * IMAGE_SIDE

# Fields of a tar member header (POSIX ustar), as byte ranges of its block.
NAME = slice(0, KEY_DIGITS)  # the key; the extension follows it
CHECKSUM = slice(148, 156)  # six octal digits, NUL, space
CHECKSUM_DIGITS = 6
SIZE_DIGIT = 134  # the last octal digit of the member's size field (bytes 124..135)
LABEL_DIGITS = 3  # labels 0..999
END_OF_ARCHIVE = 2 * BLOCK  # zero blocks after the last member
ARCHIVE_UNIT = tarfile.RECORDSIZE  # 10240: tarfile pads a closed archive to a multiple of this


def _npy_header() -> bytes:
    """What ``np.save`` writes before the 784 pixels of a uint8 ``(28, 28)`` image."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.uint8))
    return buf.getvalue()[:-PIXELS]


NPY_HEADER = _npy_header()  # 128 bytes: np.save pads its header to a multiple of 64
NPY_SIZE = len(NPY_HEADER) + PIXELS
_NPY_BLOCKS = -(-NPY_SIZE // BLOCK)

# Offsets inside one sample's record.
CLS_MEMBER = 0  # header block of {key}.cls
LABEL = CLS_MEMBER + BLOCK  # its one data block: the label's digits, then zeros
NPY_MEMBER = LABEL + BLOCK  # header block of {key}.npy
IMAGE = NPY_MEMBER + BLOCK + len(NPY_HEADER)  # the pixels, after the .npy header
RECORD = NPY_MEMBER + BLOCK + _NPY_BLOCKS * BLOCK  # 2560 bytes per sample
_HEADERS = (CLS_MEMBER, NPY_MEMBER)  # where each member header starts


def _member_header(extension: str, size: int) -> np.ndarray:
    """uint8 ``(512,)``: the header TarWriter writes for key 00000000, its checksum field
    blank (eight spaces, as the checksum is computed)."""
    info = tarfile.TarInfo(f"{0:0{KEY_DIGITS}d}.{extension}")
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
    header = np.frombuffer(info.tobuf(tarfile.PAX_FORMAT), np.uint8).copy()
    header[CHECKSUM] = ord(" ")
    return header


def _template() -> np.ndarray:
    """uint8 ``(RECORD,)``: the record of sample 0 with label 0 (one digit) and black pixels,
    the digits of its checksums blank (spaces), then the NUL and space that end them."""
    record = np.zeros(RECORD, np.uint8)
    record[CLS_MEMBER:CLS_MEMBER + BLOCK] = _member_header("cls", 1)
    record[LABEL] = ord("0")
    record[NPY_MEMBER:NPY_MEMBER + BLOCK] = _member_header("npy", NPY_SIZE)
    record[NPY_MEMBER + BLOCK:IMAGE] = np.frombuffer(NPY_HEADER, np.uint8)
    record[[h + CHECKSUM.start + CHECKSUM_DIGITS for h in _HEADERS]] = 0
    return record


_TEMPLATE = _template()
# Each header's checksum over the template, its checksum field all spaces (as tar sums it).
_BLANK_SUMS = [int(_TEMPLATE[h:h + BLOCK].sum(dtype=np.int64)) + ord(" ") for h in _HEADERS]
_FOUR_DIGITS = (np.arange(10 ** 4)[:, None] // 10 ** np.arange(3, -1, -1) % 10 + ord("0")).astype(np.uint8)
_FOUR_DIGIT_SUMS = (_FOUR_DIGITS - ord("0")).sum(1, dtype=np.int64)
_OCTAL_SHIFTS = 3 * np.arange(CHECKSUM_DIGITS - 1, -1, -1)
CHECK_CHUNK = 512  # records compared at a time: their 852 KB of headers stay in cache


def _keys_and_checksums(first: int, widths: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 ASCII ``(n, KEY_DIGITS)`` keys of samples ``first, first + 1, ...`` and, for each
    member header, their ``(n, CHECKSUM_DIGITS)`` octal checksums, given the number of
    digits of each label, ``widths`` ``(n,)`` (the .cls size: 1 in the template)."""
    high, low = np.divmod(first + np.arange(len(widths), dtype=np.int64), 10 ** 4)
    digits = np.concatenate([_FOUR_DIGITS[high], _FOUR_DIGITS[low]], axis=1)
    key_sum = _FOUR_DIGIT_SUMS[high] + _FOUR_DIGIT_SUMS[low]  # the template's key is "00000000"
    sums = [_BLANK_SUMS[0] + key_sum + widths - 1, _BLANK_SUMS[1] + key_sum]
    return digits, [((total[:, None] >> _OCTAL_SHIFTS) & 7 | ord("0")).astype(np.uint8) for total in sums]


def _label_text(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(n,)`` in 0..999 as ``str(label)`` writes them: uint8 ``(n, LABEL_DIGITS)``,
    the digits left-aligned and zero-padded, and their number ``(n,)``."""
    labels = np.asarray(labels, np.int64)
    widths = 1 + (labels >= 10) + (labels >= 100)
    power = widths[:, None] - 1 - np.arange(LABEL_DIGITS)  # of the digit; negative past the last
    text = np.where(power >= 0, labels[:, None] // 10 ** np.maximum(power, 0) % 10 + ord("0"), 0)
    return text.astype(np.uint8), widths


def _varying(first: int, labels: np.ndarray) -> list[tuple[slice, np.ndarray]]:
    """The bytes in which the records of samples ``first, first + 1, ...`` with labels
    ``(n,)`` in 0..999 differ from the template: ``(columns, uint8 (n, width))`` pairs."""
    text, widths = _label_text(labels)
    digits, checksums = _keys_and_checksums(first, widths)
    size = CLS_MEMBER + SIZE_DIGIT
    pairs = [(slice(LABEL, LABEL + LABEL_DIGITS), text),
             (slice(size, size + 1), (widths + ord("0")).astype(np.uint8)[:, None])]
    for header, checksum in zip(_HEADERS, checksums, strict=True):
        at = header + CHECKSUM.start
        pairs += [(slice(header + NAME.start, header + NAME.stop), digits),
                  (slice(at, at + CHECKSUM_DIGITS), checksum)]
    return pairs


def records(first: int, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 ``(n, RECORD)``: the records of samples ``first, first + 1, ...`` with uint8
    images ``(n, 1, 28, 28)`` and labels ``(n,)`` in 0..999."""
    n = len(labels)
    out = np.empty((n, RECORD), np.uint8)
    out[:] = _TEMPLATE
    for columns, values in _varying(first, labels):
        out[:, columns] = values
    out[:, IMAGE:IMAGE + PIXELS] = images.reshape(n, PIXELS)
    return out


def archive_size(count: int) -> int:
    """Bytes of a shard of ``count`` samples: records, end-of-archive blocks, padding."""
    return -(-(count * RECORD + END_OF_ARCHIVE) // ARCHIVE_UNIT) * ARCHIVE_UNIT


def archive_padding(count: int) -> np.ndarray:
    """The zero bytes that end a shard of ``count`` samples, after its records."""
    return np.zeros(archive_size(count) - count * RECORD, np.uint8)


def labels_bytes(labels: np.ndarray) -> bytes:
    """Labels as the manifest's ``labels_sha256`` hashes them: int64, little-endian."""
    return np.ascontiguousarray(labels, dtype="<i8").tobytes()


def labels_digest(labels: np.ndarray) -> str:
    """Hex sha256 of a shard's labels, as the manifest records it."""
    return hashlib.sha256(labels_bytes(labels)).hexdigest()


def decode_shard(data, first: int, count: int, name: str, num_classes: int = 10 ** LABEL_DIGITS,
                 labels_sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check a shard's bytes against the layout (keys ``first..first + count - 1``, labels
    below ``num_classes`` and, given ``labels_sha256``, hashing to it as int64) and return
    its uint8 images ``(count, 1, 28, 28)`` and int64 labels ``(count,)``, both copies (so
    ``data`` can be freed); errors name the shard and the sample."""
    a = np.frombuffer(data, np.uint8)
    if len(a) != archive_size(count):
        raise FastMNISTError(f"{name}: {len(a)} bytes, {count} samples make {archive_size(count)}")
    rows = a[:count * RECORD].reshape(count, RECORD)
    labels = _labels(rows)
    if labels is None:
        raise FastMNISTError(f"{name}: sample {int(np.argmax(~_valid_labels(rows)))}: the .cls "
                             "entry is not a number from 0 to 999 (corrupted)")
    if (labels >= num_classes).any():
        wrong = int(np.argmax(labels >= num_classes))
        raise FastMNISTError(f"{name}: sample {wrong}: label {labels[wrong]} is not a class of this set "
                             f"(0..{num_classes - 1}; corrupted)")
    if labels_sha256 is not None and labels_digest(labels) != labels_sha256:
        raise FastMNISTError(f"{name}: its labels differ from the manifest's labels_sha256 (a .cls entry "
                             "was changed)")
    images = rows[:, IMAGE:IMAGE + PIXELS].reshape(count, 1, IMAGE_SIDE, IMAGE_SIDE).copy()
    if not _in_layout(rows, first, labels):  # find and name the first difference
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


def _valid_labels(rows: np.ndarray) -> np.ndarray:
    """bool ``(n,)``: whether each record's .cls entry is ``str(label)`` of a label in 0..999."""
    widths = rows[:, CLS_MEMBER + SIZE_DIGIT].astype(np.int64) - ord("0")
    text = rows[:, LABEL:LABEL + LABEL_DIGITS]
    inside = np.arange(LABEL_DIGITS) < widths[:, None]
    is_digit = (text >= ord("0")) & (text <= ord("9"))
    return ((widths >= 1) & (widths <= LABEL_DIGITS) & np.where(inside, is_digit, text == 0).all(1)
            & ((widths == 1) | (text[:, 0] != ord("0"))))  # str() writes no leading zero


def _labels(rows: np.ndarray) -> np.ndarray | None:
    """int64 ``(n,)``: the labels of the records ``rows``, or None where one is malformed."""
    if not _valid_labels(rows).all():
        return None
    text = rows[:, LABEL:LABEL + LABEL_DIGITS].astype(np.int64)
    value = np.zeros(len(rows), np.int64)
    for j in range(LABEL_DIGITS):
        digit = text[:, j] - ord("0")
        value = np.where(text[:, j] > 0, value * 10 + digit, value)
    return value


def _in_layout(rows: np.ndarray, first: int, labels: np.ndarray) -> bool:
    """Whether every byte of the records ``rows`` (uint8 ``(n, RECORD)``) but their pixels is
    the layout's for samples ``first, first + 1, ...`` with ``labels``: ``CHECK_CHUNK``
    records at a time against their expected bytes, built in one reused block that stays in
    cache, 8 bytes at a time."""
    pairs = _varying(first, labels)
    expected = np.empty((min(CHECK_CHUNK, len(rows)), IMAGE), np.uint8)
    expected[:] = _TEMPLATE[:IMAGE]
    for start in range(0, len(rows), CHECK_CHUNK):
        stop = min(start + CHECK_CHUNK, len(rows))
        block = expected[:stop - start]
        for columns, values in pairs:
            block[:, columns] = values[start:stop]
        if not (rows[start:stop, :IMAGE].view(np.uint64) == block.view(np.uint64)).all():
            return False
    return not rows[:, IMAGE + PIXELS:].any()
