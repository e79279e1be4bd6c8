"""Other inputs than IDX: Hugging Face parquet/Arrow/``datasets.Dataset``, ``.npz``, CSV,
image folders, foreign WebDataset shards and in-memory arrays. Each fixture is written by
the test from the real MNIST test digits with the tool its users have (pyarrow, numpy,
Pillow, webdataset's ``TarWriter``, ``datasets``), converted, and loaded: the batches must be
bit for bit those the same digits give through ``idx``."""

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmnist
from fastmnist import FastMNISTError, FastMNISTLoader, convert, convert_arrays, convert_from
from fastmnist.bench.inputs import png_bytes, write_csv, write_folder, write_parquet, write_wds
from fastmnist.cli import main

from .conftest import served

MNIST = {"mean": 0.1307, "std": 0.3081}
N = 10000


@pytest.fixture(scope="module")
def digits(real_root):
    """The real test split: uint8 ``(10000, 28, 28)`` images and int64 labels."""
    raw = real_root / "MNIST" / "raw"
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28).copy()
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


@pytest.fixture(scope="module")
def reference(real_root, tmp_path_factory):
    """The test split converted through ``idx``: the batches every other kind must give."""
    out = tmp_path_factory.mktemp("idx") / "set"
    convert(real_root, out, splits=["test"], progress=False)
    return _epoch(out)


@pytest.fixture(scope="module")
def pngs(digits):
    """Each digit as PNG bytes, written by Pillow."""
    return png_bytes(digits[0])


def _epoch(out, split="test", images="float32"):
    """Every batch of an unshuffled epoch, as two tensors: images (float32, or uint8 as
    stored) and labels."""
    batches = list(FastMNISTLoader(out, split, batch_size=1000, shuffle=False, images=images,
                                   normalize=images == "float32"))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _same(out, reference, order=None):
    x, y = _epoch(out)
    ref_x, ref_y = reference
    if order is not None:
        ref_x, ref_y = ref_x[order], ref_y[order]
    assert torch.equal(y, ref_y)
    assert torch.equal(x, ref_x)  # bit for bit: the same float32 from the same bytes


# --- each kind, bit for bit the idx conversion ----------------------------------------------

def test_npz_keras_layout(digits, reference, tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=digits[0][:600], y_train=digits[1][:600], x_test=digits[0], y_test=digits[1])
    r = convert_from(path, tmp_path / "set", progress=False, **MNIST)
    assert set(r.manifest.splits) == {"train", "test"}
    assert r.manifest.options["from"] == "npz" and r.manifest.dataset == "mnist"
    assert {v.file for v in r.manifest.inputs.values()} == {"mnist.npz"}
    _same(tmp_path / "set", reference)


def test_npz_medmnist_layout_with_multilabel(digits, tmp_path):
    """MedMNIST's names, (N, 1) labels of single-label sets, and a ChestMNIST-like set of 14
    binary labels stored as [N, 14] int64."""
    images, labels = digits
    multi = (np.random.default_rng(0).random((N, 14)) < 0.2).astype(np.uint8)
    path = tmp_path / "chestmnist.npz"
    np.savez(path, train_images=images[:7000], train_labels=multi[:7000], val_images=images[7000:8000],
             val_labels=multi[7000:8000], test_images=images[8000:], test_labels=multi[8000:])
    convert_from(path, tmp_path / "chest", progress=False)
    x, y = _epoch(tmp_path / "chest", "val", images="uint8")
    assert y.dtype == torch.int64 and y.shape == (1000, 14)
    assert torch.equal(y, torch.from_numpy(multi[7000:8000].astype(np.int64)))
    assert torch.equal(x[:, 0], torch.from_numpy(images[7000:8000]))

    single = tmp_path / "pneumoniamnist.npz"
    np.savez(single, train_images=images, train_labels=(labels % 2)[:, None])
    r = convert_from(single, tmp_path / "pneumonia", progress=False)
    info = r.manifest.splits["train"]
    assert info.num_classes == 2 and info.label_shape == ()
    # mean and std from the train split, as numpy computes them over its pixels
    assert info.mean == pytest.approx(images.mean() / 255, abs=1e-12)
    assert info.std == pytest.approx((images / 255).std(), abs=1e-12)


def test_csv_kaggle_layout_with_and_without_header(digits, reference, tmp_path):
    write_csv(tmp_path / "test.csv", *digits)
    write_csv(tmp_path / "mnist_test.csv", *digits, header=False)  # pjreddie's layout: no header
    for name in ("test.csv", "mnist_test.csv"):
        out = tmp_path / name.replace(".csv", "")
        r = convert_from(tmp_path / name, out, progress=False, **MNIST)
        assert list(r.manifest.splits) == ["test"]
        _same(out, reference)


def test_image_folder_in_torchvisions_order(digits, pngs, reference, tmp_path):
    root = write_folder(tmp_path / "folder", "test", pngs, digits[1])
    r = convert_from(root, tmp_path / "set", progress=False, **MNIST)
    assert r.manifest.options["from"] == "images" and r.manifest.options["classes"] == list("0123456789")
    # ImageFolder's own order: classes sorted by name, files sorted within one
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(root / "test")
    order = [int(p.rsplit("/", 1)[1][:5]) for p, _ in folder.samples]
    assert [c for _, c in folder.samples] == digits[1][order].tolist()
    _same(tmp_path / "set", reference, order)


def test_hf_parquet_and_class_names(digits, pngs, reference, tmp_path):
    folder = tmp_path / "hub" / "mnist"
    folder.mkdir(parents=True)
    # as the Hub stores ylecun/mnist: split in the file name, several files per split
    write_parquet(folder / "test-00000-of-00002.parquet", pngs[:5000], digits[1][:5000], list("0123456789"))
    write_parquet(folder / "test-00001-of-00002.parquet", pngs[5000:], digits[1][5000:], list("0123456789"))
    r = convert_from(tmp_path / "hub", tmp_path / "set", progress=False, **MNIST)
    assert r.manifest.options["classes"] == list("0123456789")
    assert [v.file for v in r.manifest.inputs.values()] == [
        "mnist/test-00000-of-00002.parquet", "mnist/test-00001-of-00002.parquet"]
    _same(tmp_path / "set", reference)


def test_hf_datasets_objects_and_save_to_disk(digits, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im) for im in digits[0]], "label": digits[1].tolist()},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=list("0123456789"))}))
    whole = datasets.DatasetDict({"test": ds})
    convert_from(whole, tmp_path / "in-memory", progress=False, **MNIST)
    _same(tmp_path / "in-memory", reference)

    whole.save_to_disk(tmp_path / "saved")  # Arrow stream files under saved/test/
    r = convert_from(tmp_path / "saved", tmp_path / "from-disk", progress=False, **MNIST)
    assert r.manifest.options["classes"] == list("0123456789")
    assert all(not v.file.startswith("/") for v in r.manifest.inputs.values())
    _same(tmp_path / "from-disk", reference)

    # a shuffled view: the rows the Dataset shows, not those its Arrow table stores
    order = np.random.default_rng(1).permutation(N)
    convert_from(ds.select(order), tmp_path / "selected", split="test", progress=False, **MNIST)
    _same(tmp_path / "selected", reference, torch.from_numpy(order))


def test_hf_datasets_cache_of_a_loaded_dataset(digits, pngs, reference, tmp_path):
    """``load_dataset`` writes Arrow files into its cache (``.../parquet-test.arrow``): that
    folder converts as it is."""
    datasets = pytest.importorskip("datasets")
    source = write_parquet(tmp_path / "mnist.parquet", pngs, digits[1], list("0123456789"))
    loaded = datasets.load_dataset("parquet", data_files={"test": str(source)},
                                   cache_dir=str(tmp_path / "cache"))
    assert loaded["test"].cache_files  # the Arrow files in the cache
    r = convert_from(tmp_path / "cache", tmp_path / "set", progress=False, **MNIST)
    assert list(r.manifest.splits) == ["test"]
    _same(tmp_path / "set", reference)


def test_foreign_webdataset_with_chosen_members(digits, tmp_path):
    """PGM images under ``pgm`` and the class as ``label.txt``: named with image_key/label_key."""
    import webdataset as wds
    from PIL import Image

    images, labels = digits[0][:300], digits[1][:300]
    with wds.TarWriter(str(tmp_path / "digits.tar")) as sink:
        for i, (im, label) in enumerate(zip(images, labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PPM")  # a P5 (grey) PGM for mode L
            sink.write({"__key__": f"d{i:04d}", "pgm": buf.getvalue(), "label.txt": str(label).encode()})
    with pytest.raises(FastMNISTError, match=r"digits\.tar: key d0000: no cls member \(it has "
                                             r"label\.txt, pgm\)"):
        convert_from(tmp_path / "digits.tar", tmp_path / "set", progress=False)
    convert_from(tmp_path / "digits.tar", tmp_path / "set", image_key="pgm", label_key="label.txt",
                 progress=False, num_classes=10)
    x, y = _epoch(tmp_path / "set", "train", "uint8")
    assert torch.equal(x[:, 0], torch.from_numpy(images)) and y.tolist() == labels.tolist()


def test_foreign_webdataset_shards_local_and_over_http(digits, pngs, reference, tmp_path):
    folder = write_wds(tmp_path / "shards", "test", pngs, digits[1])
    convert_from(folder, tmp_path / "local", progress=False, **MNIST)
    _same(tmp_path / "local", reference)
    with served(folder) as url:
        r = convert_from(url + "test-{000000..000002}.tar", tmp_path / "http", progress=False, **MNIST)
    assert [v.file for v in r.manifest.inputs.values()][0].endswith("/test-000000.tar")
    _same(tmp_path / "http", reference)


def test_convert_arrays_in_memory(digits, reference, tmp_path):
    images, labels = digits
    r = convert_arrays(images, labels, tmp_path / "set", split="test", progress=False, **MNIST)
    assert r.manifest.inputs["test"].file == "(in memory)"
    _same(tmp_path / "set", reference)
    again = convert_arrays(images[:, None], labels, tmp_path / "set", split="test", progress=False, **MNIST)
    assert not again.skipped  # (N, 1, 28, 28) is another input; its set has the same bytes
    _same(tmp_path / "set", reference)
    assert convert_arrays(images[:, None], labels, tmp_path / "set", split="test", progress=False,
                          **MNIST).skipped


def test_tar_output_from_a_foreign_kind(digits, reference, tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_test=digits[0], y_test=digits[1])
    convert_from(path, tmp_path / "set", format="wds", shard_size=3000, progress=False, **MNIST)
    x, y = _epoch(tmp_path / "set")
    assert torch.equal(y, reference[1]) and torch.equal(x, reference[0])


# --- splits, normalisation, conversions ----------------------------------------------------

def test_val_fraction_is_a_seeded_recorded_draw(digits, tmp_path):
    images, labels = digits
    r = convert_arrays(images, labels, tmp_path / "a", val_fraction=0.1, seed=7, progress=False)
    assert r.manifest.options["val_fraction"] == 0.1 and r.manifest.options["val_seed"] == 7
    train, val = _epoch(tmp_path / "a", "train", "uint8"), _epoch(tmp_path / "a", "val", "uint8")
    assert len(val[1]) == 1000 and len(train[1]) == 9000
    # together, exactly the input: every image once, and each split in the input's order
    held = np.zeros(N, bool)
    held[np.random.default_rng(7).permutation(N)[:1000]] = True
    assert torch.equal(val[0][:, 0], torch.from_numpy(images[held]))
    assert torch.equal(train[0][:, 0], torch.from_numpy(images[~held]))
    assert torch.equal(train[1], torch.from_numpy(labels[~held]))
    # mean/std from the train split that remains
    assert r.manifest.splits["val"].mean == pytest.approx(images[~held].mean() / 255, abs=1e-12)
    convert_arrays(images, labels, tmp_path / "b", val_fraction=0.1, seed=8, progress=False)
    assert not torch.equal(_epoch(tmp_path / "b", "val", "uint8")[0], val[0])


def test_grayscale_and_resize_only_when_asked_and_recorded(digits, tmp_path):
    from PIL import Image

    images = digits[0][:50]
    rgb = np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize((32, 32))) for im in images])
    with pytest.raises(FastMNISTError, match=r"train arrays: images of shape 32x32x3, expected 28x28"):
        convert_arrays(rgb, digits[1][:50], tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    r = convert_arrays(rgb, digits[1][:50], tmp_path / "set", grayscale=True, resize=True, progress=False)
    assert r.manifest.options["grayscale"].startswith("Pillow convert('L')")
    assert r.manifest.options["resize"].startswith("Pillow resize to 28x28")
    x, _ = _epoch(tmp_path / "set", "train", "uint8")
    expected = [np.asarray(Image.fromarray(im).convert("L").resize((28, 28), Image.Resampling.BILINEAR))
                for im in rgb]
    assert torch.equal(x[:, 0], torch.from_numpy(np.stack(expected)))


def test_cli_detects_the_kind_and_records_relative_inputs(digits, tmp_path, capsys):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=digits[0][:500], y_train=digits[1][:500])
    assert main(["convert", str(path), "--out", str(tmp_path / "set"), "--quiet"]) == 0
    text = (tmp_path / "set" / "manifest.json").read_text()
    assert str(tmp_path) not in text  # no absolute path of this machine
    m = fastmnist.open_shards(tmp_path / "set").manifest
    assert m.splits["train"].count == 500 and m.options["from"] == "npz"
    assert main(["convert", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "a .npz or .csv file is given itself" in capsys.readouterr().err
    assert main(["convert", "--root", str(tmp_path), "--out", str(tmp_path / "x"),
                 "--grayscale"]) == 2
    assert "--grayscale: applies to inputs other than idx" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    (mixed / "0").mkdir(parents=True)
    (mixed / "0" / "a.png").write_bytes(b"")
    (mixed / "train.parquet").write_bytes(b"")
    assert main(["convert", str(mixed), "--out", str(tmp_path / "x")]) == 2
    assert "holds hf and images; pass --from" in capsys.readouterr().err


def test_idx_manifest_records_inputs_relative_to_the_root(real_root, tmp_path):
    r = convert(real_root, tmp_path / "set", splits=["test"], progress=False)
    assert [v.file for v in r.manifest.inputs.values()] == [
        "MNIST/raw/t10k-images-idx3-ubyte.gz", "MNIST/raw/t10k-labels-idx1-ubyte.gz"]


# --- hostile inputs: a clear error naming the file and the row or key; nothing written -------

def _refused(tmp_path, match, source, **kw):
    out = tmp_path / "out"
    with pytest.raises(FastMNISTError, match=match):
        convert_from(source, out, progress=False, **MNIST, **kw)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_hostile_png_inputs_name_the_key(digits, pngs, tmp_path):
    from PIL import Image

    def rgb(im):
        buf = io.BytesIO()
        Image.fromarray(im).convert("RGB").save(buf, format="PNG")
        return buf.getvalue()

    def big(im):
        buf = io.BytesIO()
        Image.fromarray(im).resize((32, 32)).save(buf, format="PNG")
        return buf.getvalue()

    def deep(im):  # 16 bits a pixel: 784 levels, which convert("L") would clip to a handful
        buf = io.BytesIO()
        Image.fromarray((np.arange(784).reshape(28, 28) * 83).astype(np.uint16)).save(buf, format="PNG")
        return buf.getvalue()

    cases = {"corrupt": (lambda b: b[:60] + b"\0" * 40, r"key sample000017: not a readable image"),
             "rgb": (lambda b: rgb(digits[0][17]), r"key sample000017: a RGB image \(3 channels\)"),
             "big": (lambda b: big(digits[0][17]), r"key sample000017: 32x32 pixels, expected 28x28"),
             "deep": (lambda b: deep(digits[0][17]), r"key sample000017: a I;16 image \(more than 8 bits")}
    for name, (spoil, match) in cases.items():
        def bad(i, sample, spoil=spoil):
            return {**sample, "png": spoil(sample["png"])} if i == 17 else sample
        folder = write_wds(tmp_path / name, "test", pngs[:100], digits[1][:100], spoil=bad)
        _refused(tmp_path, r"^test-000000\.tar: " + match, folder)
        if name == "deep":  # --grayscale would clip it: refused too, saying so
            _refused(tmp_path, r"--grayscale would clip every pixel above 255", folder, grayscale=True)
    folder = write_wds(tmp_path / "nocls", "test", pngs[:100], digits[1][:100],
                       spoil=lambda i, s: {k: v for k, v in s.items() if k != "cls"} if i == 42 else s)
    _refused(tmp_path, r"test-000000\.tar: key sample000042: no cls member \(it has png\)", folder)
    folder = tmp_path / "notar"
    folder.mkdir()
    (folder / "test-000000.tar").write_bytes(b"not a tar" * 100)
    _refused(tmp_path, r"test-000000\.tar: not a readable tar archive", folder)


def test_hostile_labels_name_the_row(digits, pngs, tmp_path):
    images, labels = digits
    for value in (10, -1):
        bad = labels[:100].copy()
        bad[33] = value
        write_parquet(tmp_path / f"test-{value}.parquet", pngs[:100], bad, list("0123456789"))
        _refused(tmp_path, rf"test-{value}\.parquet: row 33: label {value}, expected a class in 0\.\.9",
                 tmp_path / f"test-{value}.parquet")
        np.savez(tmp_path / f"bad{value}.npz", x_train=images[:100], y_train=bad)
        _refused(tmp_path, rf"bad{value}\.npz: x_train/y_train: index 33: label {value}",
                 tmp_path / f"bad{value}.npz", num_classes=10)


def test_hf_files_of_one_split_that_disagree(digits, pngs, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    write_parquet(tmp_path / "in" / "test-0.parquet", pngs[:10], digits[1][:10])
    pq.write_table(pa.table({"label": pa.array(digits[1][10:20])}), tmp_path / "in" / "test-1.parquet")
    _refused(tmp_path, r"test-0\.parquet, test-1\.parquet: files of one split with different columns",
             tmp_path / "in")
    (tmp_path / "in" / "test-1.parquet").write_bytes(b"PAR1 not parquet")
    _refused(tmp_path, r"test-1\.parquet: not a readable parquet file", tmp_path / "in")


def test_hostile_csv_npz_and_folders(digits, pngs, tmp_path):
    images, labels = digits
    rows = [f"{lb}," + ",".join(map(str, im.reshape(-1))) for im, lb in zip(images[:20], labels[:20],
                                                                            strict=True)]
    rows[6] = rows[6].rsplit(",", 1)[0]  # 783 pixels
    (tmp_path / "short.csv").write_text("\n".join(rows) + "\n")
    _refused(tmp_path, r"short\.csv: line 7: 784 columns, expected 785", tmp_path / "short.csv")
    rows[6] = rows[7].replace(",0,", ",x,", 1)
    (tmp_path / "text.csv").write_text("\n".join(rows) + "\n")
    _refused(tmp_path, r"text\.csv: could not convert string 'x' to int64 at row 6", tmp_path / "text.csv")
    rows[6] = rows[7].replace(",0,", ",300,", 1)
    (tmp_path / "range.csv").write_text("\n".join(rows) + "\n")
    _refused(tmp_path, r"range\.csv: line 7: a pixel value outside 0\.\.255 \(300\)", tmp_path / "range.csv")
    (tmp_path / "nolabel.csv").write_text(",".join(f"pixel{i}" for i in range(785)) + "\n" + rows[0] + "\n")
    _refused(tmp_path, r"nolabel\.csv: no label column among 785 columns \(a header without label\)",
             tmp_path / "nolabel.csv")

    np.savez(tmp_path / "mismatch.npz", x_train=images[:100], y_train=labels[:99])
    _refused(tmp_path, r"mismatch\.npz: x_train has 100 images but y_train has 99 labels",
             tmp_path / "mismatch.npz")
    np.savez(tmp_path / "pickled.npz", x_train=np.array([object()] * 3), y_train=labels[:3])
    _refused(tmp_path, r"pickled\.npz: x_train/y_train: unreadable", tmp_path / "pickled.npz")
    np.savez(tmp_path / "both.npz", x_train=images[:10], y_train=labels[:10], train_images=images[10:20],
             train_labels=labels[10:20])
    _refused(tmp_path, r"both\.npz: two image arrays for split 'train' \('[a-z_]+' and '[a-z_]+'\): "
                       r"choose one", tmp_path / "both.npz")
    huge = labels[:100].astype(np.uint64)
    huge[41] = 2**64 - 1  # as int64, -1: it must be reported as stored
    np.savez(tmp_path / "uint64.npz", x_train=images[:100], y_train=huge)
    _refused(tmp_path, r"uint64\.npz: x_train/y_train: label 41: expected a class, found "
                       r"18446744073709551615 \(uint64", tmp_path / "uint64.npz")
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really")
    _refused(tmp_path, r"garbage\.npz: not a readable \.npz archive", tmp_path / "garbage.npz")

    folder = tmp_path / "folder"
    for i in range(30):
        (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
        (folder / str(labels[i]) / f"{i:05d}.png").write_bytes(pngs[i] if i != 12 else b"\x89PNG broken")
    _refused(tmp_path, rf"folder: {labels[12]}/00012\.png: not a readable image", folder)


def test_kaggle_test_csv_without_labels_is_an_unlabelled_split(digits, tmp_path, capsys):
    """Kaggle's test.csv (pixels only) beside its train.csv: the test split's labels are -1,
    the manifest says it has none, and the loader checks that they are all -1."""
    images, labels = digits
    write_csv(tmp_path / "train.csv", images[:6000], labels[:6000])
    np.savetxt(tmp_path / "test.csv", images[6000:].reshape(-1, 784), fmt="%d", delimiter=",",
               header=",".join(f"pixel{i}" for i in range(784)), comments="")
    convert_from(tmp_path / "train.csv", tmp_path / "train", progress=False)
    r = convert_from(tmp_path / "test.csv", tmp_path / "test", num_classes=10, progress=False, **MNIST)
    assert not r.manifest.splits["test"].labelled and r.manifest.splits["test"].num_classes == 10
    x, y = _epoch(tmp_path / "test", "test", "uint8")
    assert torch.equal(x[:, 0], torch.from_numpy(images[6000:])) and (y == -1).all()
    assert main(["info", str(tmp_path / "test")]) == 0
    assert "test: 4000 samples, mean 0.1307, std 0.3081, no labels (each -1)" in capsys.readouterr().out
    with pytest.raises(FastMNISTError, match=r"test split has no labels, which tar shards"):
        convert_from(tmp_path / "test.csv", tmp_path / "tar", format="wds", progress=False, **MNIST)
    # in memory too: labels=None; a labelled file swapped in under the manifest is refused
    convert_arrays(images[:50], None, tmp_path / "mem", split="test", progress=False, **MNIST)
    np.save(tmp_path / "mem" / "test_labels.npy", labels[:50])  # a valid .npy of the same shape
    with pytest.raises(FastMNISTError, match=r"test_labels\.npy: label 0: expected -1 \(the split has no "
                                             r"labels\), found 7"):
        list(FastMNISTLoader(tmp_path / "mem", "test", shuffle=False))


def test_manifest_of_an_unlabelled_split_is_checked(digits, tmp_path):
    from fastmnist.formats.manifest import parse_manifest

    convert_arrays(digits[0][:30], None, tmp_path / "set", split="test", progress=False, **MNIST)
    text = (tmp_path / "set" / "manifest.json").read_text()
    assert parse_manifest(text, "m").splits["test"].labelled is False
    raw = json.loads(text)
    raw["splits"]["test"]["labelled"] = "no"
    with pytest.raises(FastMNISTError, match=r"splits\.test\.labelled: expected true or false"):
        parse_manifest(json.dumps(raw), "m")
    raw["splits"]["test"]["labelled"] = False
    raw["splits"]["test"]["wds"] = {"shard_size": 30, "shards": []}
    with pytest.raises(FastMNISTError, match=r"splits\.test\.labelled: an unlabelled split has \.npy"):
        parse_manifest(json.dumps(raw), "m")


def test_a_failed_conversion_keeps_the_set_already_there(digits, tmp_path):
    images, labels = digits
    convert_arrays(images[:100], labels[:100], tmp_path / "out", progress=False)
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    bad = labels[:100].copy()
    bad[5] = -1
    with pytest.raises(FastMNISTError, match="index 5: label -1"):
        convert_arrays(images[:100], bad, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
    assert fastmnist.verify_shards(tmp_path / "out") == []


def test_unsafe_tar_member_names_are_only_read(digits, pngs, tmp_path):
    """A foreign tar is read from memory, never extracted: ../ names write nothing."""
    path = tmp_path / "shards" / "test-000000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            for ext, data in (("png", pngs[i]), ("cls", str(digits[1][i]).encode())):
                info = tarfile.TarInfo(f"../../escape{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    convert_from(path.parent, tmp_path / "set", progress=False, **MNIST)
    assert not list(tmp_path.parent.glob("escape*"))
    assert _epoch(tmp_path / "set")[1].tolist() == digits[1][:3].tolist()


def test_decoding_in_processes_gives_the_same_images_and_names_the_bad_one(digits, pngs):
    from fastmnist.formats.pictures import decode

    assert np.array_equal(decode(pngs, "x", str, workers=2), digits[0])
    spoiled = list(pngs)
    spoiled[7001] = b"\x89PNG\r\n\x1a\n" + b"\0" * 30
    with pytest.raises(FastMNISTError, match=r"^shards: image 7001: not a readable image"):
        decode(spoiled, "shards", lambda i: f"image {i}", workers=2)


def _tar_of(path: Path, members: list[tuple[str, bytes]], **pax_for: dict) -> Path:
    """A pax-format tar of ``members`` (name, bytes); ``pax_for[name]``: that member's pax records."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), pax_for.get(name, {})
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_sample_with_two_members_of_one_kind_is_refused_as_webdataset_refuses_it(digits, pngs, tmp_path):
    import webdataset as wds

    members = [(f"{i:06d}.{ext}", data) for i in range(4)
               for ext, data in (("png", pngs[i]), ("cls", str(digits[1][i]).encode()))]
    members.insert(3, ("000001.png", pngs[9]))  # a second image for sample 1: which is it?
    path = _tar_of(tmp_path / "twice.tar", members)
    with pytest.raises(ValueError, match="duplicate file name"):
        list(wds.WebDataset(str(path), shardshuffle=False))
    _refused(tmp_path, r"twice\.tar: key 000001: two png members", path)


def test_a_pax_size_is_the_members_size_as_tarfile_takes_it(digits, pngs, tmp_path):
    """A member whose pax ``size`` record is its true size and whose ustar size field says
    otherwise (0): read as tarfile and webdataset read it, 20 samples, the same images."""
    members = [(f"{i:06d}.{ext}", data) for i in range(20)
               for ext, data in (("png", pngs[i]), ("cls", str(digits[1][i]).encode()))]
    path = _tar_of(tmp_path / "pax.tar", members, **{"000005.png": {"size": str(len(pngs[5]))}})
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        at = tar.getmember("000005.png").offset_data - 512  # its ustar header, after its pax header
    data[at + 124:at + 136] = b"%011o\0" % 0
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % sum(data[at:at + 512])
    path.write_bytes(bytes(data))
    with tarfile.open(path) as tar:
        reference = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert len(reference) == 40 and reference["000005.png"] == pngs[5]
    import webdataset as wds

    assert [int(s["cls"]) for s in wds.WebDataset(str(path), shardshuffle=False)] == digits[1][:20].tolist()
    convert_from(path, tmp_path / "set", progress=False, **MNIST)
    x, y = _epoch(tmp_path / "set", "train", "uint8")
    assert torch.equal(x[:, 0], torch.from_numpy(digits[0][:20])) and y.tolist() == digits[1][:20].tolist()


def test_image_folder_with_subfolders_links_and_other_files_is_read_as_imagefolder_reads_it(
        digits, pngs, tmp_path):
    """Images in subfolders of a class folder, a class folder that is a link, a linked image,
    a .gif and a .txt beside them: the same samples, labels and order as torchvision's
    ``ImageFolder``; and a changed image behind the linked class folder is a new input (the
    re-run converts again, where it said "up to date")."""
    from torchvision.datasets import ImageFolder

    root, elsewhere = tmp_path / "folder", tmp_path / "elsewhere"
    for i in range(24):
        where = root / str(i % 3) / ("deep/er" if i % 4 == 0 else "sub" if i % 4 == 1 else "")
        where.mkdir(parents=True, exist_ok=True)
        (where / f"{i:05d}.png").write_bytes(pngs[i])
    (elsewhere / "linked").mkdir(parents=True)
    for i in range(24, 28):
        (elsewhere / "linked" / f"{i:05d}.png").write_bytes(pngs[i])
    (root / "3").symlink_to(elsewhere / "linked")
    (root / "0" / "00099.png").symlink_to(elsewhere / "linked" / "00024.png")
    (root / "1" / "note.txt").write_text("not an image")
    (root / "2" / "00098.gif").write_bytes(b"GIF89a")  # ImageFolder skips .gif

    reference = ImageFolder(root)
    r = convert_from(root, tmp_path / "set", progress=False, **MNIST)
    x, y = _epoch(tmp_path / "set", "train", "uint8")
    assert len(x) == len(reference.samples) == 29
    assert y.tolist() == [c for _, c in reference.samples]
    for k, (path, _) in enumerate(reference.samples):
        assert torch.equal(x[k, 0], torch.from_numpy(np.array(reference.loader(path).convert("L"))))

    assert convert_from(root, tmp_path / "set", progress=False, **MNIST).skipped
    (elsewhere / "linked" / "00025.png").write_bytes(pngs[99])
    again = convert_from(root, tmp_path / "set", progress=False, **MNIST)
    assert not again.skipped and again.manifest.inputs != r.manifest.inputs


def test_an_image_folder_with_a_link_loop_is_refused(pngs, tmp_path):
    root = tmp_path / "folder"
    (root / "0").mkdir(parents=True)
    (root / "0" / "00000.png").write_bytes(pngs[0])
    (root / "0" / "again").symlink_to(root / "0")
    _refused(tmp_path, r"0/again: a link to a folder it is in \(a loop\)", root)


def test_a_rerun_with_other_options_converts_again(digits, tmp_path):
    """The up-to-date check compares every option that changes the set: another
    ``num_classes`` or ``split`` converts again; the same ones do not; 0 classes is refused."""
    images, labels = digits
    path = write_csv(tmp_path / "digits.csv", images[:200], labels[:200])
    out = tmp_path / "set"
    first = convert_from(path, out, num_classes=10, split="test", progress=False, **MNIST)
    assert convert_from(path, out, num_classes=10, split="test", progress=False, **MNIST).skipped
    wider = convert_from(path, out, num_classes=12, split="test", progress=False, **MNIST)
    assert not wider.skipped and wider.manifest.splits["test"].num_classes == 12
    moved = convert_from(path, out, num_classes=12, split="train", progress=False, **MNIST)
    assert not moved.skipped and list(moved.manifest.splits) == ["train"]
    assert first.manifest.splits["test"].num_classes == 10
    with pytest.raises(FastMNISTError, match="num_classes 0: expected 1"):
        convert_from(path, tmp_path / "none", num_classes=0, progress=False, **MNIST)


@pytest.mark.parametrize("images, kwargs, message", [
    (np.zeros((10, 28, 28), np.uint8), {}, r"every pixel of the train split is 0 \(std 0\)"),
    (np.zeros((0, 28, 28), np.uint8), {}, r"train arrays: the train split has no samples"),
    (np.ones((10, 28, 28), np.uint8), {"val_fraction": 0.96}, r"val_fraction 0.96 of the train split's 10 "
                                                               r"samples leaves train empty"),
    (np.ones((10, 28, 28), np.uint8), {"val_fraction": 0.01}, r"leaves val empty"),
    (np.ones((10, 28, 28), np.uint8), {"format": "wds", "shard_size": 2_000_000},
     r"shard_size must be in 1\.\.1,000,000, got 2000000"),
])
def test_a_set_that_cannot_be_made_is_refused_before_anything_is_written(images, kwargs, message, tmp_path):
    """Refused naming the input and what is wrong, not at the end naming a temporary manifest."""
    out = tmp_path / "set"
    with pytest.raises(FastMNISTError, match=message) as caught:
        convert_arrays(images, np.arange(len(images)) % 10, out, progress=False, **kwargs)
    assert ".tmp-" not in str(caught.value) and not out.exists()
    assert not list(tmp_path.glob(".set.tmp-*"))


@pytest.mark.parametrize("rows, message", [
    ([[1, 0], [0, 1, 1], [1, 1]], r"row 1: column 'labels' holds \[0, 1, 1\], expected a list of 2 integers"),
    ([[1, 0], None, [1, 1]], r"row 1: column 'labels' holds None, expected a list of 2 integers"),
])
def test_ragged_parquet_label_lists_are_refused_naming_the_row(pngs, tmp_path, rows, message):
    """A multi-label column whose lists differ in length (or hold a null): refused naming the
    row, as every other bad row is (it was a numpy traceback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.array([{"bytes": b, "path": None} for b in pngs[:3]],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": image, "labels": pa.array(rows, pa.list_(pa.int64()))}), path)
    _refused(tmp_path, message, path, label_key="labels")


def _refused_and_growth(source: Path, out: Path) -> tuple[str, int]:
    """``convert_from(source, out)`` in a fresh process: its error (or "") and how many MB its
    peak resident memory (VmHWM, reset after the imports by Linux's clear_refs 5) grew."""
    script = (
        "import re\n"
        "from fastmnist import FastMNISTError, convert_from\n"
        "def peak():\n    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = peak()\n"
        f"try:\n    convert_from({str(source)!r}, {str(out)!r}, progress=False)\n"
        "except FastMNISTError as e:\n    print(e)\n"
        "print((peak() - before) // 1024)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr
    message, grown = ("\n" + done.stdout.strip()).rsplit("\n", 1)
    return message.strip(), int(grown)


def _npz_member(archive: zipfile.ZipFile, name: str, header_shape: tuple, dtype: str, body: int) -> None:
    """Write ``name.npy`` into ``archive`` (deflated): a header for ``header_shape`` of ``dtype``,
    then ``body`` zero bytes, streamed."""
    header = io.BytesIO()
    described = {"descr": dtype, "fortran_order": False, "shape": header_shape}
    np.lib.format.write_array_header_1_0(header, described)
    with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
        f.write(header.getvalue())
        for start in range(0, body, 1 << 24):
            f.write(bytes(min(1 << 24, body - start)))


@pytest.mark.parametrize("case", ["bomb", "header claims more"])
def test_an_npz_that_would_inflate_past_its_limit_is_refused_unread(tmp_path, case):
    """A 256 MiB array of zeros deflated to about 0.25 MB (1000x), and a header claiming a
    billion images over 10 bytes: refused before numpy inflates or allocates anything; the
    refusing process's peak resident memory grows by under 64 MB (a fresh process; inflating
    the bomb grew it by 256 MB and more)."""
    path = tmp_path / f"{case.replace(' ', '_')}.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        if case == "bomb":
            count = (256 << 20) // 784
            _npz_member(archive, "x_train", (count, 28, 28), "|u1", count * 784)
        else:
            count = 10
            _npz_member(archive, "x_train", (10**9, 28, 28), "|u1", 10)
        _npz_member(archive, "y_train", (count,), "<i8", count * 8)
    message, grown = _refused_and_growth(path, tmp_path / "set")
    expected = r"x_train would inflate from [\d,]+ to 268,435,[\d,]+ bytes \(\d[\d,]*x; the limit is 100x" \
        if case == "bomb" else r"x_train: its header claims 784,000,000,000 bytes"
    assert re.search(expected, message), message
    assert grown < 64, f"peak RSS grew by {grown} MB"  # 0 MB here; 268 MB before the check
    assert not (tmp_path / "set").exists()


def test_empty_inputs_are_refused_naming_the_file(tmp_path):
    """An empty CSV and a parquet file of no rows: refused naming the file, before anything
    is written (they failed at the end, naming a temporary manifest already deleted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.csv").write_text("")
    _refused(tmp_path, r"empty\.csv: empty \(no rows\)", tmp_path / "empty.csv")
    image = pa.array([], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": image, "label": pa.array([], pa.int64())}), path)
    _refused(tmp_path, r"train-00000-of-00001\.parquet: the train split has no samples", path)


def test_a_csv_line_past_its_limit_is_refused_before_it_is_split(tmp_path):
    """A first line of 52 MB (27 million one-digit columns): refused naming the line and the
    limit; the refusing process's peak resident memory grows by under 400 MB (111 MB here: the
    file read and decoded; splitting the line into columns took 2,146 MB)."""
    path = tmp_path / "long.csv"
    path.write_text("1," * (26 << 20) + "1\n")
    message, grown = _refused_and_growth(path, tmp_path / "set")
    assert re.search(r"long\.csv: line 1: 54,525,953 characters, over the limit of 65,536", message), message
    assert grown < 400, f"peak RSS grew by {grown} MB"


def test_a_tar_gz_that_inflates_past_its_limit_is_refused(tmp_path):
    """A .tar.gz whose one member is 256 MiB of zeros (about 0.25 MB compressed): refused once
    64 MiB are inflated (the limit: 100x its size past 64 MiB), naming the limit; the peak
    resident memory grows by under 200 MB (127 MB here; 513 MB when it was inflated whole)."""
    path = tmp_path / "train-000000.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("000000.npy")
        info.size = 256 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert path.stat().st_size < (1 << 20)
    message, grown = _refused_and_growth(path, tmp_path / "set")
    assert re.search(r"train-000000\.tar\.gz: more than 67,108,864 bytes once decompressed \(the limit: 100x",
                     message), message
    assert grown < 200, f"peak RSS grew by {grown} MB"
