"""The IDX reader: real files read right, every malformed input gets a clear FastMNISTError."""

import gzip
import lzma
import tracemalloc

import numpy as np
import pytest
import torch
import torchvision

from fastmnist import FastMNISTError
from fastmnist.formats.datasets import DATASETS
from fastmnist.formats.idx import XZ_MEMORY_LIMIT, read_images, read_labels, write_idx


def test_md5_table_is_torchvisions():
    for spec in DATASETS.values():
        cls = getattr(torchvision.datasets, spec.folder)
        if spec.folder == "QMNIST":
            expected = {url.rsplit("/", 1)[1]: md5 for files in cls.resources.values() for url, md5 in files}
        elif spec.folder == "EMNIST":  # one zip of every split; its md5 cannot check a file
            expected = {}
        else:
            expected = dict(cls.resources)
        assert spec.md5 == expected, spec.name


def test_reads_real_files_like_torchvision(torchvision_test_root, real_root):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = torchvision_test_root / "MNIST" / "raw"
    images = read_images(real_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")
    labels = read_labels(real_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.uint8
    assert torch.equal(torch.from_numpy(images[:, 0]), read_image_file(str(raw / "t10k-images-idx3-ubyte")))
    assert torch.equal(torch.from_numpy(labels).long(), read_label_file(str(raw / "t10k-labels-idx1-ubyte")))
    # the extracted file reads the same as the .gz
    assert np.array_equal(read_images(raw / "t10k-images-idx3-ubyte"), images)


def _images(n=3):
    return np.full((n, 28, 28), 7, np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_wrong_magic(tmp_path, gz):
    path = write_idx(tmp_path / ("x.gz" if gz else "x"), np.zeros(5))  # a label file
    with pytest.raises(FastMNISTError, match=r"x(\.gz)?: bad magic number: expected 2051, found 2049"):
        read_images(path)


@pytest.mark.parametrize("name, message", [
    # a plain file's size is known up front: caught before reading
    ("img", r"img: header claims \[3, 28, 28\] = 2352 bytes of data, more than the 2358-byte file"),
    ("img.gz", r"img\.gz: data length: header \[3, 28, 28\] expects 2352 bytes, found 2342"),
])
def test_truncated_body(tmp_path, name, message):
    path = write_idx(tmp_path / "full", _images())
    data = path.read_bytes()[:-10]
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(FastMNISTError, match=message):
        read_images(tmp_path / name)


def test_truncated_header(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"\x00\x00\x08\x03\x00")
    with pytest.raises(FastMNISTError, match="img: truncated header: expected 16 bytes, found 5"):
        read_images(path)


@pytest.mark.parametrize("gz", [False, True])
def test_header_claims_more_than_file_holds(tmp_path, gz):
    path = tmp_path / ("img.gz" if gz else "img")
    data = bytearray(write_idx(tmp_path / "full", _images()).read_bytes())
    data[4:8] = (1_000_000_000).to_bytes(4, "big")  # a billion images
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    with pytest.raises(FastMNISTError, match=r"img(\.gz)?: header claims \[1000000000, 28, 28\] "
                       r"= 784000000000 bytes of data, more than the \d+-byte file can hold"):
        read_images(path)


def test_wrong_image_size(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (32).to_bytes(4, "big") * 2
                     + bytes(2 * 32 * 32))
    with pytest.raises(FastMNISTError, match="img: image size: expected 28x28, found 32x32"):
        read_images(path)


def test_label_out_of_range(tmp_path):
    path = write_idx(tmp_path / "lab", np.array([1, 2, 10, 3]))
    with pytest.raises(FastMNISTError, match="lab: label 2: expected a class in 0..9, found 10"):
        read_labels(path)


def test_corrupt_gzip(tmp_path):
    path = write_idx(tmp_path / "img.gz", _images())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[len(data) // 2 + 1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FastMNISTError, match=r"img\.gz: "):
        read_images(path)


def test_not_gzip_at_all(tmp_path):
    path = tmp_path / "img.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(FastMNISTError, match=r"img\.gz: cannot read: .*gzip"):
        read_images(path)


def test_missing_file(tmp_path):
    with pytest.raises(FastMNISTError, match="nope: file not found"):
        read_images(tmp_path / "nope")


def test_xz_reads_like_the_extracted_file_and_refuses_hostile_streams(tmp_path):
    """xz (QMNIST's nist files): read as the extracted file reads; a 60-byte file whose header
    asks the decoder for a 1.5 GiB dictionary is refused without allocating it; data cut
    short or followed by more data is refused, naming the file."""
    images = np.random.default_rng(0).integers(0, 256, (300, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "img.xz", images)
    assert np.array_equal(read_images(path)[:, 0], images)
    body = lzma.decompress(path.read_bytes())
    hostile = tmp_path / "huge-dictionary.xz"
    hostile.write_bytes(lzma.compress(body, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1536 << 20}]))
    tracemalloc.start()
    with pytest.raises(FastMNISTError, match=r"huge-dictionary\.xz: cannot read: Memory usage limit"):
        read_images(hostile)
    assert tracemalloc.get_traced_memory()[1] < XZ_MEMORY_LIMIT
    tracemalloc.stop()
    (tmp_path / "trailing.xz").write_bytes(path.read_bytes() + b"more")
    with pytest.raises(FastMNISTError, match=r"trailing\.xz: cannot read: data after the end of the xz"):
        read_images(tmp_path / "trailing.xz")
    (tmp_path / "cut.xz").write_bytes(path.read_bytes()[:-30])
    with pytest.raises(FastMNISTError, match=r"cut\.xz: cannot read: compressed data ended"):
        read_images(tmp_path / "cut.xz")
