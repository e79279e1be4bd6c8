"""The MNIST family beyond MNIST: EMNIST (every split) and QMNIST (every split, class and
8-column labels) converted bit-exact to what torchvision's own classes yield from the same
raw files, and an EMNIST-shaped set (62 classes) split, streamed and resumed exactly once."""

import gzip
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

from fastmnist import FastMNISTError, FastMNISTLoader, convert
from fastmnist.conversion.synth import qmnist_columns
from fastmnist.formats.datasets import DATASETS, get_spec
from fastmnist.formats.idx import read_images, read_labels, write_idx

from .conftest import batch_indices, indexed_images, served

EMNIST_SPLITS = [name for name in DATASETS if name.startswith("emnist-")]
QMNIST_SPLITS = ["train", "test", "test10k", "test50k", "nist"]


@pytest.fixture(scope="module")
def digits(real_root):
    """The real test digits, uint8 ``(10000, 28, 28)``, and their labels."""
    raw = real_root / "MNIST" / "raw"
    images = read_images(raw / "t10k-images-idx3-ubyte.gz")[:, 0]
    return images, read_labels(raw / "t10k-labels-idx1-ubyte.gz")


def _write(raw, stem, array, compressions=("",)):
    for suffix in compressions:
        write_idx(raw / (stem + suffix), array)


def _reference(dataset, mean, std):
    """Everything ``dataset`` (a torchvision dataset without transform) yields with
    ``ToTensor()`` + ``Normalize``, collated as a DataLoader does."""
    dataset.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    batches = list(DataLoader(dataset, batch_size=4096, shuffle=False))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _ours(out, split, format):
    loader = FastMNISTLoader(out, split, batch_size=4096, shuffle=False, format=format)
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _train_mean_std(images: np.ndarray) -> tuple[float, float]:
    pixels = images.astype(np.float64) / 255
    return float(pixels.mean()), float(pixels.std())


@pytest.fixture(scope="module")
def emnist_root(digits, tmp_path_factory):
    """Raw files of every EMNIST split, extracted as torchvision leaves them: the real digits
    re-packed (train 3,000, test 2,000; a different slice per split), labels spread over
    each split's classes (letters: 1..26)."""
    images, labels = digits
    root = tmp_path_factory.mktemp("emnist")
    raw = root / "EMNIST" / "raw"
    for k, name in enumerate(EMNIST_SPLITS):
        spec = get_spec(name)
        low = 1 if name == "emnist-letters" else 0
        for split, start, n in (("train", 500 * k, 3000), ("test", 5000 + 500 * k, 2000)):
            rows = slice(start, start + n)
            spread = low + (labels[rows].astype(np.int64) * 7 + np.arange(n)) % (spec.num_classes - low)
            _write(raw, spec.splits[split].images, images[rows])
            _write(raw, spec.splits[split].labels, spread.astype(np.uint8))
    return root


@pytest.mark.parametrize("name", EMNIST_SPLITS)
def test_emnist_is_bit_exact_to_torchvision(emnist_root, tmp_path, name):
    spec = get_spec(name)
    out = tmp_path / name
    convert(emnist_root, out, name, format="both", progress=False)
    train = read_images(emnist_root / "EMNIST" / "raw" / spec.splits["train"].images)
    mean, std = _train_mean_std(train)
    for split in ("train", "test"):
        info = FastMNISTLoader(out, split).info
        assert info.num_classes == spec.num_classes
        assert math.isclose(info.mean, mean, rel_tol=1e-12) and math.isclose(info.std, std, rel_tol=1e-12)
        reference = torchvision.datasets.EMNIST(emnist_root, split=name.split("-", 1)[1],
                                                train=split == "train")
        x_ref, y_ref = _reference(reference, info.mean, info.std)
        for format in ("npy", "wds"):
            x, y = _ours(out, split, format)
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref) and y.dtype == torch.int64, (split, format)
    if name == "emnist-byclass":  # two-digit labels through the tar shards, as webdataset reads them
        assert int(y_ref.max()) == 61


@pytest.fixture(scope="module")
def qmnist_root(digits, tmp_path_factory):
    """QMNIST's raw files as torchvision leaves them, extracted beside the downloads (.gz,
    and .xz for nist): train 3,000, test 12,000 (so test50k has 2,000), nist 2,500."""
    images, labels = digits
    root = tmp_path_factory.mktemp("qmnist")
    raw = root / "QMNIST" / "raw"
    rows = {"train": np.arange(3000), "test": np.r_[np.arange(10000), np.arange(2000)],
            "nist": np.arange(7500, 10000)}
    spec = get_spec("qmnist")
    for seed, (split, index) in enumerate(rows.items()):
        compressed = ".xz" if split == "nist" else ".gz"
        x = images[index] if split != "test" else np.concatenate([images, images[:2000].transpose(0, 2, 1)])
        _write(raw, spec.splits[split].images, x, ("", compressed))
        _write(raw, spec.splits[split].labels, qmnist_columns(labels[index], seed), ("", compressed))
    return root


@pytest.mark.parametrize("extended", [False, True])
def test_qmnist_is_bit_exact_to_torchvision(qmnist_root, tmp_path, extended):
    name = "qmnist-extended" if extended else "qmnist"
    out = tmp_path / name
    convert(qmnist_root, out, name, splits=QMNIST_SPLITS, progress=False)
    raw = qmnist_root / "QMNIST" / "raw"
    mean, std = _train_mean_std(read_images(raw / "qmnist-train-images-idx3-ubyte"))
    counts = {"train": 3000, "test": 12000, "test10k": 10000, "test50k": 2000, "nist": 2500}
    for split in QMNIST_SPLITS:
        info = FastMNISTLoader(out, split).info
        assert info.count == counts[split]
        assert math.isclose(info.mean, mean, rel_tol=1e-12) and math.isclose(info.std, std, rel_tol=1e-12)
        x_ref, y_ref = _reference(torchvision.datasets.QMNIST(qmnist_root, what=split, compat=not extended),
                                  info.mean, info.std)
        x, y = _ours(out, split, "npy")
        assert y.shape == ((counts[split], 8) if extended else (counts[split],))
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref), split
        assert y.dtype == y_ref.dtype == torch.int64
    # one sample through loader.dataset, as torchvision's QMNIST gives it
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((info.mean,), (info.std,))])
    reference = torchvision.datasets.QMNIST(qmnist_root, what="test50k", compat=not extended, transform=tf)
    x0, y0 = FastMNISTLoader(out, "test50k").dataset[5]
    x_ref0, y_ref0 = reference[5]
    assert torch.equal(x0, x_ref0)
    assert (torch.equal(y0, y_ref0) if extended else y0 == y_ref0 and isinstance(y0, int))


def test_qmnist_extended_labels_refuse_tar_shards(qmnist_root, tmp_path):
    with pytest.raises(FastMNISTError, match="qmnist-extended: its labels are 8 numbers per sample"):
        convert(qmnist_root, tmp_path / "x", "qmnist-extended", format="wds", progress=False)


def test_qmnist_label_out_of_range_names_the_file_and_row(qmnist_root, tmp_path):
    raw = tmp_path / "QMNIST" / "raw"
    spec = get_spec("qmnist")
    columns = qmnist_columns(np.arange(20) % 10, 0)
    columns[13, 0] = 10
    _write(raw, spec.splits["train"].images, np.zeros((20, 28, 28), np.uint8))
    _write(raw, spec.splits["train"].labels, columns)
    with pytest.raises(FastMNISTError, match=r"qmnist-train-labels-idx2-int: label 13: expected a class "
                                             r"in 0\.\.9, found 10"):
        convert(tmp_path, tmp_path / "x", "qmnist", splits=["train"], mean=0.5, std=0.5, progress=False)


def test_unknown_split_of_a_dataset(emnist_root, tmp_path):
    with pytest.raises(FastMNISTError, match="unknown split 'nist' of emnist-letters: expected one of "
                                             "train, test"):
        convert(emnist_root, tmp_path / "x", "emnist-letters", splits=["nist"], progress=False)


N = 1003


@pytest.fixture(scope="module")
def byclass_set(tmp_path_factory):
    """An EMNIST-byclass-shaped set (62 classes) whose images encode their index, as .npy and
    tar shards of 100; the raw files gzip-compressed."""
    root = tmp_path_factory.mktemp("byclass")
    spec = get_spec("emnist-byclass")
    raw = root / "EMNIST" / "raw"
    for split, n in (("train", N), ("test", 10)):
        write_idx(raw / (spec.splits[split].images + ".gz"), indexed_images(n))
        write_idx(raw / (spec.splits[split].labels + ".gz"), (np.arange(n) * 7 % 62).astype(np.uint8))
    convert(root, root / "set", "emnist-byclass", format="both", shard_size=100, progress=False)
    return root


def test_emnist_shaped_set_is_split_exactly_once_and_resumes(byclass_set):
    path = byclass_set / "set"
    for format in ("npy", "wds"):
        seen = []
        for rank in range(3):
            loader = FastMNISTLoader(path, batch_size=32, seed=3, rank=rank, world_size=3, normalize=False,
                                     format=format)
            for x, y in loader:
                index = batch_indices([(x, y)])[0]
                assert y.tolist() == [i * 7 % 62 for i in index]
                seen += index
        order = FastMNISTLoader(path, seed=3, format=format).source.order(3, 0, True).tolist()
        padding = order[:math.ceil(N / 3) * 3 - N]  # repeated, as DistributedSampler does
        assert Counter(seen) == Counter(order + padding)
        whole = list(FastMNISTLoader(path, batch_size=50, seed=3, normalize=False, format=format))
        first = FastMNISTLoader(path, batch_size=50, seed=3, normalize=False, format=format)
        it = iter(first)
        for _ in range(7):
            next(it)
        resumed = FastMNISTLoader(path, batch_size=50, seed=3, normalize=False, format=format)
        resumed.load_state_dict(first.state_dict())
        rest = list(resumed)
        assert len(rest) == len(whole) - 7
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(rest, whole[7:], strict=True))


def test_emnist_shaped_shards_stream_over_http(byclass_set):
    with served(byclass_set) as base:
        loader = FastMNISTLoader(base + "set/", batch_size=64, seed=1, normalize=False)
        batches = list(loader)
    index = [i for b in batch_indices(batches) for i in b]
    assert sorted(index) == list(range(N))
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == [i * 7 % 62 for i in index] and max(labels) == 61


def test_gzip_and_extracted_raw_files_convert_the_same(byclass_set, tmp_path):
    raw = byclass_set / "EMNIST" / "raw"
    plain = tmp_path / "EMNIST" / "raw"
    plain.mkdir(parents=True)
    for path in raw.glob("*.gz"):
        (plain / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
    convert(tmp_path, tmp_path / "set", "emnist-byclass", format="both", shard_size=100, progress=False)
    for split in ("train", "test"):
        a, b = (FastMNISTLoader(s, split, shuffle=False, batch_size=2000)
                for s in (byclass_set / "set", tmp_path / "set"))
        (xa, ya), (xb, yb) = next(iter(a)), next(iter(b))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
