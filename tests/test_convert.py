"""The converter: bit-exact against torchvision, verifiable, idempotent, safe on bad input."""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms

from fastmnist import FastMNISTError, FastMNISTLoader, convert, open_shards, verify_shards
from fastmnist.cli import main
from fastmnist.conversion.synth import write_raw

from .conftest import write_split

REPO = Path(__file__).resolve().parents[1]
TO_TENSOR_NORMALIZE = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])


def test_real_test_split_is_bit_exact_with_torchvision(real_shards, torchvision_test_root):
    reference = torchvision.datasets.MNIST(torchvision_test_root, train=False,
                                           transform=TO_TENSOR_NORMALIZE)
    expected = torch.stack([reference[i][0] for i in range(len(reference))])
    split = open_shards(real_shards).split("test")
    assert expected.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.from_numpy(np.array(split.array("images_f32"))), expected)
    assert torch.equal(torch.from_numpy(np.array(split.array("images_u8")))[:, 0], reference.data)
    labels = torch.from_numpy(np.array(split.array("labels")))
    assert labels.dtype == torch.int64 and torch.equal(labels, reference.targets)


def test_real_inputs_reported_canonical(real_shards):
    manifest = open_shards(real_shards).manifest
    assert manifest.synthetic is False
    assert {k: v.canonical for k, v in manifest.inputs.items()} == {
        "test-images": True, "test-labels": True}
    assert manifest.inputs["test-images"].md5 == "9fb629c4189551a2d022fa330f9573f3"
    assert list(manifest.splits) == ["test"]


def test_generated_60k_set_converts_and_verifies(synth_shards, capsys):
    shards = open_shards(synth_shards, verify=True)
    assert shards.synthetic
    assert {s: shards.split(s).count for s in shards.splits} == {"train": 60000, "test": 10000}
    train = shards.split("train")
    u8, f32 = train.array("images_u8"), train.array("images_f32")
    assert f32.dtype == np.float32 and f32.shape == (60000, 1, 28, 28)
    assert isinstance(f32, np.memmap)  # mapped, not read
    idx = np.arange(0, 60000, 997)
    assert torch.equal(torch.from_numpy(f32[idx]),
                       torch.stack([TO_TENSOR_NORMALIZE(im) for im in u8[idx, 0]]))
    for name in ("images_u8", "images_f32", "labels"):
        assert train.info.arrays[name].size == train.path(name).stat().st_size
    assert main(["verify", str(synth_shards)]) == 0
    assert "all files match" in capsys.readouterr().out


@pytest.fixture()
def small_root(tmp_path) -> Path:
    root = tmp_path / "raw"
    write_raw(root, 500, 200, seed=3)
    return root


def test_flipping_any_byte_fails_verify_naming_the_file(small_root, tmp_path, capsys):
    out = tmp_path / "shards"
    convert(small_root, out, progress=False)
    files = sorted(p for p in out.iterdir() if p.suffix == ".npy")
    assert len(files) == 6
    for path in files:
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        assert verify_shards(out) == [f"{path}: sha256 differs from the manifest"]
        assert main(["verify", str(out)]) == 1
        assert f"FAILED {path}: sha256 differs" in capsys.readouterr().err
        with pytest.raises(FastMNISTError, match=f"{path}: sha256 differs"):
            open_shards(out, verify=True)
        assert open_shards(out).splits == ["train", "test"]  # by default only sizes: nothing is hashed
        path.write_bytes(original)
    assert verify_shards(out) == []


def _snapshot(out: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(out.iterdir())}


def _raw(root):
    return root / "MNIST" / "raw"


def _gz_rewrite(path: Path, edit):
    data = bytearray(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(bytes(edit(data))))


def _set_count(data, n):
    data[4:8] = n.to_bytes(4, "big")
    return data


def _set_label(data, value):
    data[8 + 5] = value
    return data


MALFORMED = {
    "wrong magic": ("train-images-idx3-ubyte.gz", lambda p: _gz_rewrite(p, lambda d: d[:3] + b"\x01" + d[4:]),
                    "bad magic number: expected 2051, found 2049"),
    "truncated": ("train-images-idx3-ubyte.gz", lambda p: _gz_rewrite(p, lambda d: d[:-100]),
                  "data length: header .* expects 392000 bytes, found 391900"),
    "header count too large": ("train-images-idx3-ubyte.gz",
                               lambda p: _gz_rewrite(p, lambda d: _set_count(d, 501)),
                               # headers are compared before any body is read
                               "train-images-idx3-ubyte.gz: 501 images but .*labels-idx1-ubyte.gz has 500"),
    "count mismatch": ("train-labels-idx1-ubyte.gz",
                       lambda p: _gz_rewrite(p, lambda d: _set_count(d, 499)[:-1]),
                       "500 images but .*train-labels-idx1-ubyte.gz has 499 labels"),
    "label 10": ("train-labels-idx1-ubyte.gz", lambda p: _gz_rewrite(p, lambda d: _set_label(d, 10)),
                 "label 5: expected a class in 0..9, found 10"),
    "corrupt gzip": ("train-images-idx3-ubyte.gz",
                     lambda p: p.write_bytes(p.read_bytes()[:50] + b"\xff" * 40 + p.read_bytes()[90:]),
                     "cannot read"),
    "missing file": ("train-labels-idx1-ubyte.gz", lambda p: p.unlink(),
                     "train-labels-idx1-ubyte\\[.gz\\|.xz\\]: file not found"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_fails_clearly_and_keeps_existing_output(small_root, tmp_path, case):
    out = tmp_path / "shards"
    convert(small_root, out, progress=False)
    before = _snapshot(out)
    name, damage, message = MALFORMED[case]
    for p in _raw(small_root).iterdir():  # leave only the .gz files the converter prefers
        if p.suffix != ".gz" and p.name.endswith("ubyte"):
            p.unlink()
    damage(_raw(small_root) / name)
    with pytest.raises(FastMNISTError, match=message) as err:
        convert(small_root, out, force=True, progress=False)
    if case != "missing file":
        assert name in str(err.value)
    assert _snapshot(out) == before
    assert verify_shards(out) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards.")] == [".shards.lock"]


def test_unwritable_output_directory(small_root, tmp_path):
    """A directory the user may not write to is refused naming it. Root ignores permission
    bits (CAP_DAC_OVERRIDE), so as root (CI) the conversion runs without that capability."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    program = ("import sys\nfrom fastmnist import convert, FastMNISTError\n"
               "try:\n    convert(sys.argv[1], sys.argv[2], progress=False)\n"
               "except FastMNISTError as e:\n    print(e)\n")
    unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    command = [*unprivileged, sys.executable, "-c", program, str(small_root), str(locked / "shards")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{locked}: output directory is not writable" in done.stdout
    assert list(locked.iterdir()) == []
    blocker = tmp_path / "file"  # and a path under a regular file cannot be made by anyone
    blocker.write_text("x")
    with pytest.raises(FastMNISTError, match=f"{blocker}: cannot create output directory"):
        convert(small_root, blocker / "shards", progress=False)


def test_rerun_is_a_noop_and_force_rebuilds(small_root, tmp_path):
    out = tmp_path / "shards"
    first = convert(small_root, out, progress=False)
    before = _snapshot(out)
    again = convert(small_root, out, progress=False)
    assert again.skipped and not first.skipped
    assert _snapshot(out) == before  # same inodes: nothing rewritten
    forced = convert(small_root, out, force=True, progress=False)
    assert not forced.skipped
    after = _snapshot(out)
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}
    assert all(after[k][0] != before[k][0] for k in after if k.endswith(".npy"))
    # new options or new inputs rebuild too
    assert not convert(small_root, out, mean=0.5, std=0.25, progress=False).skipped
    assert open_shards(out).split("train").mean == 0.5
    write_raw(small_root, 501, 200, seed=3)
    assert open_shards(convert(small_root, out, mean=0.5, std=0.25, progress=False).out
                       ).split("train").count == 501


def test_refuses_to_replace_a_foreign_directory(small_root, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(FastMNISTError, match="refusing to replace a non-empty directory"):
        convert(small_root, out, progress=False)
    assert (out / "notes.txt").read_text() == "precious"


def test_other_datasets_compute_mean_std_from_train(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    write_split(tmp_path, "train", images, np.arange(50) % 10, folder="FashionMNIST")
    write_split(tmp_path, "test", images[:5], np.arange(5), folder="FashionMNIST")
    manifest = convert(tmp_path, tmp_path / "out", "fashion-mnist", progress=False).manifest
    mean, std = images.mean() / 255, (images / 255).std()
    for split in ("train", "test"):
        assert manifest.splits[split].mean == pytest.approx(mean, rel=1e-12)
        assert manifest.splits[split].std == pytest.approx(std, rel=1e-12)
    test = open_shards(tmp_path / "out").split("test")
    expected = transforms.Normalize((mean,), (std,))(torch.from_numpy(images[:5, None]).float() / 255)
    assert torch.equal(torch.from_numpy(np.array(test.array("images_f32"))), expected)
    assert manifest.inputs["train-images"].canonical is None  # no .gz: md5 unknown


def test_newer_manifest_format_is_refused(small_root, tmp_path):
    out = tmp_path / "shards"
    convert(small_root, out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FastMNISTError, match="format_version 99 is newer than this fastmnist reads"):
        open_shards(out)


def test_cli_and_tools_script_write_the_same_set(small_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    a = subprocess.run([sys.executable, str(REPO / "tools" / "convert.py"), "--root", str(small_root),
                        "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env)
    b = subprocess.run([shutil.which("fastmnist", path=Path(sys.executable).parent), "convert",
                        "--root", str(small_root), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "(SYNTHETIC data)" in a.stdout and "NOT canonical" in a.stdout
    assert "100%" in a.stderr  # the progress bar
    for path in (tmp_path / "a").glob("*.npy"):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()
    again = subprocess.run([sys.executable, str(REPO / "tools" / "convert.py"), "--root", str(small_root),
                            "--out", str(tmp_path / "a"), "--quiet"], capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""


def test_cli_info_synth_and_errors(tmp_path, capsys):
    assert main(["synth", "--root", str(tmp_path), "--train", "30", "--test", "20"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert main(["convert", "--root", str(tmp_path), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "mnist (SYNTHETIC)" in out and "train_images_f32.npy  float32  30x1x28x28" in out
    assert main(["convert", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no MNIST raw files found" in err and "fastmnist synth" in err


def test_no_float32_keeps_uint8_only_and_the_loader_gives_the_same_bits(synth_root, synth_shards, tmp_path):
    """``--no-float32``: no float32 array (4x less disk); the loader then reads uint8 by
    default and normalises it per batch to exactly the pre-normalised set's tensors."""
    out = tmp_path / "u8"
    done = subprocess.run([sys.executable, "-m", "fastmnist.cli", "convert", "--root", str(synth_root),
                           "--out", str(out), "--no-float32", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not list(out.glob("*_f32.npy")) and (out / "train_images_u8.npy").exists()
    assert open_shards(out, verify=True).split("train").info.arrays.keys() == {"images_u8", "labels"}
    lean = FastMNISTLoader(out, batch_size=256, seed=9)
    full = FastMNISTLoader(synth_shards, batch_size=256, seed=9)
    assert lean.source.dtype == torch.uint8 and full.source.dtype == torch.float32
    for (x, y), (fx, fy) in zip(lean, full, strict=True):
        assert x.dtype == torch.float32 and torch.equal(x, fx) and torch.equal(y, fy)
    with pytest.raises(FastMNISTError, match="no images_f32 array"):
        FastMNISTLoader(out, images="float32")
    with pytest.raises(FastMNISTError, match=r"'train' has no images_f32 array \(it has images_u8, labels\)"):
        open_shards(out).split("train").array("images_f32")


def test_demo_converts_with_the_convert_commands_own_defaults(tmp_path, monkeypatch):
    """The main job's convert step (its benchmark replaced: measured elsewhere) takes the
    convert command's defaults, whatever options it gains."""
    import fastmnist.cli

    write_raw(tmp_path / "data", n_train=300, n_test=50)
    monkeypatch.setattr(fastmnist.cli, "_bench", lambda args: 0)
    assert main(["demo", "--data", str(tmp_path / "data"), "--shards", str(tmp_path / "shards")]) == 0
    split = open_shards(tmp_path / "shards", verify=True).split("train")
    assert split.formats == ["npy", "wds"] and set(split.info.arrays) == {"images_u8", "images_f32", "labels"}


def test_a_missing_directory_is_reported_as_missing(tmp_path):
    with pytest.raises(FastMNISTError, match=r"nowhere: no such directory"):
        FastMNISTLoader(tmp_path / "nowhere")


@pytest.mark.parametrize("given", ["", "MNIST", "MNIST/raw"])
def test_raw_files_given_to_the_loader_get_the_convert_command(synth_root, given):
    """A torchvision root, its MNIST folder or its raw folder handed to the loader: the error
    names the exact convert command, and that command works."""
    with pytest.raises(FastMNISTError) as caught:
        FastMNISTLoader(synth_root / given)
    message = str(caught.value)
    assert "no manifest" in message
    assert f"`fastmnist convert --root {synth_root} --out shards/mnist`" in message


@pytest.mark.parametrize("too_deep", ["MNIST", "MNIST/raw"])
def test_convert_with_root_too_deep_names_the_command_that_works(synth_root, tmp_path, too_deep):
    out = tmp_path / "set"
    cli = [sys.executable, "-m", "fastmnist.cli"]
    done = subprocess.run([*cli, "convert", "--root", str(synth_root / too_deep), "--out", str(out),
                           "--quiet"], capture_output=True, text=True)
    assert done.returncode == 2
    command = f"fastmnist convert --root {synth_root} --out {out}"
    assert f"run `{command}`" in done.stderr
    assert subprocess.run([*cli, *command.split()[1:], "--quiet"]).returncode == 0
    assert FastMNISTLoader(out).info.count == 60000


def test_every_cli_option_has_help_and_shows_its_default():
    from fastmnist.cli import _parser

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"fastmnist {name} {action.option_strings or action.dest}: no help"
    convert_help = " ".join(commands["convert"].format_help().split())  # as one line
    assert "(default: npy)" in convert_help and "(default: 10000)" in convert_help
    assert "(default: mnist)" in convert_help
