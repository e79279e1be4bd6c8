"""The tar shard layout: fastmnist's vectorised writer gives the bytes webdataset's own
TarWriter gives, Python's tarfile and np.load read them, and the reader checks every byte
outside the pixels."""

import hashlib
import io
import tarfile

import numpy as np
import pytest
import webdataset
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmnist import FastMNISTError
from fastmnist.formats.tar import CHECK_CHUNK, RECORD, archive_padding, archive_size, decode_shard, records

FIRST = 123_450  # keys need not start at 0: a shard's first sample is its key
PIXELS = range(1536 + 128, 1536 + 128 + 784)  # of a record: after 3 blocks and np.save's header


def _samples(n, seed=0, classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, classes, n)


def _ours(first, images, labels) -> bytes:
    return records(first, images, labels).tobytes() + archive_padding(len(labels)).tobytes()


def _stock(first, images, labels) -> bytes:
    stock = io.BytesIO()
    with webdataset.TarWriter(stock, mtime=0) as writer:
        for i in range(len(labels)):
            writer.write({"__key__": f"{first + i:08d}", "npy": images[i, 0], "cls": int(labels[i])})
    return stock.getvalue()


@pytest.mark.parametrize("n, classes, first", [
    (1, 10, FIRST), (3, 10, FIRST), (1500, 10, FIRST), (1500, 62, FIRST), (3000, 1000, FIRST),
    (1500, 10, 9_000), (1500, 10, 99_998_500)])
def test_writer_gives_webdatasets_tarwriter_bytes(n, classes, first):
    """Labels of 1, 2 and 3 digits (EMNIST byclass has 62 classes) included; keys that cross
    9,999 to 10,000 and that end at the largest 8-digit key."""
    images, labels = _samples(n, classes=classes)
    stock = _stock(first, images, labels)
    assert _ours(first, images, labels) == stock
    assert len(stock) == archive_size(n)
    assert np.array_equal(decode_shard(stock, first, n, "s.tar")[1], labels)


def test_python_tarfile_and_np_load_read_a_shard():
    images, labels = _samples(25, classes=1000)
    with tarfile.open(fileobj=io.BytesIO(_ours(FIRST, images, labels))) as archive:
        members = archive.getmembers()
        assert [m.name for m in members[:4]] == [f"{FIRST:08d}.cls", f"{FIRST:08d}.npy",
                                                 f"{FIRST + 1:08d}.cls", f"{FIRST + 1:08d}.npy"]
        assert len(members) == 50 and all(m.mtime == 0 and m.isfile() for m in members)
        for i in range(25):  # labels 0..999: str(label), as webdataset's decoder reads it
            assert archive.extractfile(members[2 * i]).read() == str(labels[i]).encode()
            image = np.load(io.BytesIO(archive.extractfile(members[2 * i + 1]).read()))
            assert image.dtype == np.uint8 and np.array_equal(image, images[i, 0])


@pytest.mark.parametrize("classes", [10, 62, 1000])
def test_decode_returns_the_samples(classes):
    images, labels = _samples(300, classes=classes)
    got_images, got_labels = decode_shard(_ours(FIRST, images, labels), FIRST, 300, "s.tar")
    assert np.array_equal(got_images, images) and got_images.flags.c_contiguous
    assert got_labels.dtype == np.int64 and np.array_equal(got_labels, labels)


def _edit(data: bytes, offset: int, value: int) -> bytes:
    edited = bytearray(data)
    edited[offset] = value
    return bytes(edited)


@pytest.mark.parametrize("offset, value, message", [
    (5 * RECORD + 7, ord("9"), "sample 5: unexpected bytes in the .cls member header at offset 7"),
    (5 * RECORD + 150, ord("7"), "sample 5: unexpected bytes in the .cls member header at offset 150"),
    (5 * RECORD + 512, ord("x"), "sample 5: the .cls entry is not a number from 0 to 999"),
    (5 * RECORD + 513, ord("1"), "sample 5: the .cls entry is not a number"),  # 2 digits, size 1
    (5 * RECORD + 134, ord("2"), "sample 5: the .cls entry is not a number"),  # size 2, 1 digit
    (5 * RECORD + 514, ord("1"), "sample 5: the .cls entry is not a number"),
    (5 * RECORD + 520, ord("1"), "sample 5: unexpected bytes in the .cls data at offset 520"),
    (5 * RECORD + 1030, ord("a"), "sample 5: unexpected bytes in the .npy member header"),
    (5 * RECORD + 1540, 0, "sample 5: unexpected bytes in the .npy data at offset 1540"),  # its header
    (5 * RECORD + 2500, 1, "sample 5: unexpected bytes in the .npy data"),  # padding after the pixels
    (10 * RECORD + 3, 1, "bytes after the last of its 10 samples"),
])
def test_decode_names_the_damaged_sample(offset, value, message):
    images, labels = _samples(10)
    data = _edit(_ours(FIRST, images, labels), offset, value)
    with pytest.raises(FastMNISTError, match=f"s.tar: {message}"):
        decode_shard(data, FIRST, 10, "s.tar")


@pytest.mark.parametrize("sample", [511, 512, 1700, 2999])
def test_a_damaged_header_deep_in_a_shard_is_named(sample):
    """Records are checked in blocks (``CHECK_CHUNK``): one changed key digit in any block,
    the last one partial, is found and named."""
    images, labels = _samples(3000)
    data = _ours(FIRST, images, labels)
    offset = sample * RECORD + 1024 + 7  # the last digit of the .npy member's key
    message = f"s.tar: sample {sample}: unexpected bytes in the .npy member header"
    with pytest.raises(FastMNISTError, match=message):
        decode_shard(_edit(data, offset, data[offset] ^ 1), FIRST, 3000, "s.tar")


@pytest.mark.parametrize("offset", [1, 3, 4])
def test_a_shard_at_any_address_decodes_and_is_checked(offset):
    """Records are compared 8 bytes at a time: a buffer whose data does not start at a
    multiple of 8 decodes the same, and a damaged key is still named."""
    images, labels = _samples(600)
    buffer = bytearray(offset) + _ours(FIRST, images, labels)
    got_images, got_labels = decode_shard(memoryview(buffer)[offset:], FIRST, 600, "s.tar")
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    buffer[offset + 550 * RECORD + 3] ^= 1
    with pytest.raises(FastMNISTError, match="s.tar: sample 550: unexpected bytes in the .cls member header"):
        decode_shard(memoryview(buffer)[offset:], FIRST, 600, "s.tar")


def test_decode_refuses_other_keys_and_lengths():
    images, labels = _samples(10)
    data = _ours(FIRST, images, labels)
    with pytest.raises(FastMNISTError, match="s.tar: sample 0: unexpected bytes in the .cls member header"):
        decode_shard(data, FIRST + 10, 10, "s.tar")  # another shard's samples
    with pytest.raises(FastMNISTError, match="s.tar: 30720 bytes, 13 samples make 40960"):
        decode_shard(data, FIRST, 13, "s.tar")


def test_pixels_are_not_checked_but_hashed():
    """A flipped pixel is a valid sample: only the manifest's sha256 (``verify``) tells."""
    images, labels = _samples(4)
    data = _ours(FIRST, images, labels)
    flipped = _edit(data, 2 * RECORD + PIXELS[10], data[2 * RECORD + PIXELS[10]] ^ 1)
    assert decode_shard(flipped, FIRST, 4, "s.tar")[0][2, 0, 0, 10] != images[2, 0, 0, 10]
    assert hashlib.sha256(flipped).hexdigest() != hashlib.sha256(data).hexdigest()


def test_every_byte_outside_the_pixels_is_checked():
    """Each byte of a record but its pixels, changed on its own (the label digit to a
    non-digit), is refused, naming the record."""
    images, labels = _samples(3)
    data = _ours(FIRST, images, labels)
    for column in (c for c in range(RECORD) if c not in PIXELS):
        offset = RECORD + column
        damaged = _edit(data, offset, data[offset] ^ (0xFF if column == 512 else 1))
        assert damaged != data
        with pytest.raises(FastMNISTError, match="s.tar: sample 1: "):
            decode_shard(damaged, FIRST, 3, "s.tar")


def test_decode_refuses_a_label_the_set_does_not_have():
    """A well-formed record whose label is not one of the set's classes (62 in a 10-class
    set: only its sha256 would otherwise tell) is refused, naming the sample."""
    images, labels = _samples(10)
    labels[4] = 62
    data = _ours(FIRST, images, labels)
    assert decode_shard(data, FIRST, 10, "s.tar", num_classes=100)[1][4] == 62
    with pytest.raises(FastMNISTError, match=r"s\.tar: sample 4: label 62 is not a class of this set"):
        decode_shard(data, FIRST, 10, "s.tar", num_classes=10)


FUZZ_SAMPLES = CHECK_CHUNK + 40  # two blocks of the check, the second partial
_FUZZ_IMAGES, _FUZZ_LABELS = _samples(FUZZ_SAMPLES, seed=7, classes=62)
_FUZZ_SHARD = _ours(FIRST, _FUZZ_IMAGES, _FUZZ_LABELS)
# key, size, checksum, label, padding: bytes whose change a lax check would miss
_TELLING = [7, 134, 148, 153, 154, 155, 512, 513, 514, 515, 1024 + 7, 1024 + 153, 1536 + 127, 2448, 2559]
_RECORD = st.one_of(st.integers(0, FUZZ_SAMPLES - 1),  # hypothesis favours small ones: name the edges too
                    st.sampled_from([CHECK_CHUNK - 1, CHECK_CHUNK, CHECK_CHUNK + 1, FUZZ_SAMPLES - 1]))
_EDIT = st.one_of(
    st.tuples(st.integers(0, len(_FUZZ_SHARD) - 1), st.integers(0, 255)),  # anywhere, any byte
    st.builds(lambda i, column, value: (i * RECORD + column, value), _RECORD,
              st.one_of(st.sampled_from(_TELLING), st.integers(0, RECORD - 1)),
              st.sampled_from(b"0123456789 \0")))  # digits where digits are


@settings(max_examples=400, deadline=2000)
@given(edits=st.lists(_EDIT, max_size=6), cut=st.one_of(st.none(), st.integers(0, len(_FUZZ_SHARD) - 1)),
       first=st.sampled_from([FIRST, FIRST + 1]))
def test_a_shard_is_decoded_only_if_it_is_exactly_the_layout(edits, cut, first):
    """Hostile bytes (any bytes changed, digits put where digits belong, the shard cut short,
    keys other than the manifest's): decoding raises ``FastMNISTError`` naming the shard, or
    returns samples whose records, written again, are the input byte for byte, so only
    pixels can differ from what was written; and a shard changed only in pixels decodes."""
    data = bytearray(_FUZZ_SHARD)
    for offset, value in edits:
        data[offset] = value
    data = bytes(data[:cut] if cut is not None else data)
    only_pixels = cut is None and first == FIRST and all(
        offset < FUZZ_SAMPLES * RECORD and offset % RECORD in PIXELS
        for offset, value in edits if value != _FUZZ_SHARD[offset])
    try:
        images, labels = decode_shard(data, first, FUZZ_SAMPLES, "s.tar", num_classes=62)
    except FastMNISTError as e:
        assert str(e).startswith("s.tar: ") and not only_pixels, e
        return
    assert _ours(first, images, labels) == data
