"""What a newcomer runs into in the first hour: each trap is refused with a message that
says the fix, or now does the right thing, checked against the loader iterated directly."""

import gc
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastmnist import FastMNISTError, FastMNISTLoader, convert, convert_from
from fastmnist.cli import main

from .conftest import INDEXED_N, batch_indices, indexed_images, served, write_split

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def indexed_wds(tmp_path_factory):
    """The indexed set with tar shards too (3 of them), for the URL tests."""
    root = tmp_path_factory.mktemp("indexed_wds")
    write_split(root, "train", indexed_images(INDEXED_N), np.arange(INDEXED_N) % 10)
    write_split(root, "test", indexed_images(10), np.arange(10) % 10)
    convert(root, root / "set", format="both", shard_size=400, progress=False)
    return root / "set"


@pytest.mark.parametrize("kwargs, message", [
    ({"shuffle": "no"}, "shuffle must be True or False, got 'no'"),
    ({"drop_last": "no"}, "drop_last must be True or False, got 'no'"),
    ({"even": 0}, "even must be True or False, got 0"),
    ({"seed": None}, "seed must be a non-negative integer, got None"),
    ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ({"seed": 1.5}, "seed must be a non-negative integer, got 1.5"),
    ({"device": "mps"}, r"device='mps': .* the CPU or to a CUDA device; .*\(x.to\('mps'\)\)"),
    ({"device": "gpu0"}, "device must be 'cpu' or a CUDA device"),
    ({"prefetch": True}, "prefetch must be a positive integer, got True"),
    ({"format": "tar"}, "format must be 'npy' or 'wds' or None, got 'tar'"),
    ({"rank": True, "world_size": 2}, "rank True is out of range"),
])
def test_arguments_of_the_wrong_kind_are_refused_when_the_loader_is_made(indexed_shards, kwargs, message):
    with pytest.raises(FastMNISTError, match=message):
        FastMNISTLoader(indexed_shards, **kwargs)


@pytest.mark.parametrize("options", [{}, {"batch_size": 64}, {"num_workers": 2}])
def test_a_dataloader_that_would_stack_the_batches_is_refused_with_the_fix(indexed_shards, options):
    loader = FastMNISTLoader(indexed_shards, batch_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match=r"wrap it as DataLoader\(loader, batch_size=None, \.\.\.\)") as e:
            next(iter(DataLoader(loader, **options)))
    assert isinstance(e.value, FastMNISTError) or "FastMNISTError" in str(e.value)  # from a worker
    x, _ = next(iter(DataLoader(loader, batch_size=None)))
    assert x.shape == (100, 1, 28, 28)


@pytest.mark.parametrize("options", [{}, {"persistent_workers": True}, {"multiprocessing_context": "spawn"}])
def test_passes_of_a_dataloader_with_workers_go_through_the_epochs(indexed_shards, options):
    """Each pass of DataLoader(loader, batch_size=None, num_workers=2) is the loader's next
    epoch, as when the loader is iterated directly; loader.epoch and the state follow."""
    direct = FastMNISTLoader(indexed_shards, batch_size=50, normalize=False)
    expected = [batch_indices(direct) for _ in range(3)]
    loader = FastMNISTLoader(indexed_shards, batch_size=50, normalize=False)
    wrapped = DataLoader(loader, batch_size=None, num_workers=2, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        passes = [batch_indices(wrapped) for _ in range(3)]
    assert passes == expected and passes[0] != passes[1]
    assert all(sorted(i for b in p for i in b) == list(range(INDEXED_N)) for p in passes)
    assert loader.epoch == 3 and loader.state_dict()["epoch"] == 3
    loader.set_epoch(1)  # as DistributedSampler users do; the parent's choice holds again
    assert batch_indices(loader) == expected[1]


def test_set_epoch_before_each_pass_of_a_dataloader_with_workers(indexed_shards):
    direct = FastMNISTLoader(indexed_shards, batch_size=50, normalize=False)
    expected = {e: batch_indices(direct) for e in range(3)}
    loader = FastMNISTLoader(indexed_shards, batch_size=50, normalize=False)
    wrapped = DataLoader(loader, batch_size=None, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in (2, 0, 2):
            loader.set_epoch(epoch)
            assert batch_indices(wrapped) == expected[epoch]


def test_close_releases_the_files_and_an_unclosed_loader_leaves_none_open(indexed_shards):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = FastMNISTLoader(indexed_shards, batch_size=100)
        assert sum(len(y) for _, y in loader) == INDEXED_N
        del loader
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    with FastMNISTLoader(indexed_shards, batch_size=100) as loader:
        assert sum(len(y) for _, y in loader) == INDEXED_N
    with pytest.raises(FastMNISTError, match="this loader was closed; make a new FastMNISTLoader"):
        iter(loader)


def test_synth_leaves_raw_files_it_did_not_write_alone(real_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(real_root / "MNIST" / "raw", raw)
    before = {p.name: p.read_bytes() for p in raw.iterdir()}
    assert main(["synth", "--root", str(tmp_path), "--train", "20", "--test", "10"]) == 2
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == before
    assert main(["synth", "--root", str(tmp_path), "--train", "20", "--test", "10", "--force"]) == 0
    assert (raw / "t10k-images-idx3-ubyte.gz").read_bytes() != before["t10k-images-idx3-ubyte.gz"]
    # synth's own files are replaced without --force: the command can be run again
    assert main(["synth", "--root", str(tmp_path), "--train", "30", "--test", "10"]) == 0


def test_synth_refusal_names_the_file_and_the_fix(real_root, tmp_path, capsys):
    shutil.copytree(real_root / "MNIST" / "raw", tmp_path / "MNIST" / "raw")
    main(["synth", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert "t10k-images-idx3-ubyte.gz: raw mnist file already there (real data?)" in err
    assert "another --root, or pass --force" in err


def test_a_set_url_reads_the_same_with_or_without_its_slash(indexed_wds):
    def epoch(url):
        return batch_indices(FastMNISTLoader(url, batch_size=100, normalize=False, retry=None))

    with served(indexed_wds) as url:
        expected = epoch(url)
        assert sorted(i for b in expected for i in b) == list(range(INDEXED_N))
        assert epoch(url.rstrip("/")) == expected
        assert epoch(url + "manifest.json") == expected
    with served(indexed_wds.parent) as url:
        assert epoch(url + "set") == expected


def test_the_command_line_greets_a_newcomer(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastmnist") and "convert" in out and "Start with: fastmnist convert" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("fastmnist 0.")
    for command in ("convert", "info", "verify", "push", "synth", "bench", "scale", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "Example: fastmnist " + command in capsys.readouterr().out


def test_a_closed_pipe_ends_the_command_quietly(indexed_shards):
    done = subprocess.run(f"{sys.executable} -m fastmnist.cli info {indexed_shards} | head -1", shell=True,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(str(indexed_shards))
    reader = subprocess.Popen([sys.executable, "-m", "fastmnist.cli", "info", str(indexed_shards)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # before it writes a line
    assert reader.wait() == 0 and reader.stderr.read() == b""


def test_info_and_verify_take_the_urls_the_loader_takes(indexed_wds, tmp_path, capsys):
    with served(indexed_wds) as url:
        assert main(["info", url.rstrip("/")]) == 0
        out = capsys.readouterr().out
        assert "train: 1003 samples" in out and "train-000002.tar" in out
        assert main(["verify", url]) == 0
        assert "all files match the manifest" in capsys.readouterr().out
    damaged = tmp_path / "set"
    shutil.copytree(indexed_wds, damaged)
    shard = damaged / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 1
    shard.write_bytes(bytes(data))
    with served(damaged) as url:
        assert main(["verify", url]) == 1
    assert "train-000001.tar: sha256 differs from the manifest" in capsys.readouterr().err


def test_fastmnist_tar_shards_convert_back_bit_for_bit(real_root, tmp_path):
    """`convert --from wds` of the converter's own tar shards (.npy members) gives the
    same batches as the set they came from."""
    convert(real_root, tmp_path / "set", format="both", shard_size=4000, progress=False)
    assert main(["convert", str(tmp_path / "set" / "test-{000000..000002}.tar"), "--from", "wds",
                 "--out", str(tmp_path / "back"), "--split", "test", "--mean", "0.1307", "--std", "0.3081",
                 "--quiet"]) == 0
    original = next(iter(FastMNISTLoader(tmp_path / "set", "test", batch_size=10000, shuffle=False)))
    back = next(iter(FastMNISTLoader(tmp_path / "back", "test", batch_size=10000, shuffle=False)))
    assert torch.equal(original[0], back[0]) and torch.equal(original[1], back[1])


def test_a_npy_member_of_another_shape_is_named(real_root, tmp_path):
    import webdataset

    with webdataset.TarWriter(str(tmp_path / "odd.tar")) as sink:
        sink.write({"__key__": "000000", "npy": np.zeros((28, 28), np.uint8), "cls": 1})
        sink.write({"__key__": "000001", "npy": np.zeros((28, 29), np.uint8), "cls": 2})
    with pytest.raises(FastMNISTError, match=r"odd.tar: key 000001.npy: uint8 \(28, 29\), but .*000000.npy"):
        convert_from(tmp_path / "odd.tar", tmp_path / "out", kind="wds", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_launched_process_without_a_process_group_is_refused(indexed_shards, tmp_path):
    """torchrun starts 2 processes that make a loader without init_process_group (a plain
    ``Accelerator()`` on a machine without GPUs does the same): each would read the whole set
    as rank 0 of 1. Both are refused, saying what to do."""
    job = tmp_path / "job.py"
    job.write_text(f"from fastmnist import FastMNISTLoader\nFastMNISTLoader({str(indexed_shards)!r})\n")
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", str(job)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert done.stderr.count("launched as one of WORLD_SIZE=2 processes") == 2, done.stderr[-3000:]
    assert "init_process_group" in done.stderr


def test_a_world_size_without_a_rank_is_refused(indexed_shards, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(FastMNISTError, match="world_size=2 without rank="):
        FastMNISTLoader(indexed_shards, world_size=2)
    assert FastMNISTLoader(indexed_shards, world_size=1).world_size == 1
    halves = FastMNISTLoader(indexed_shards, rank=1, world_size=2, batch_size=10)
    assert len(halves.sampler) == -(-INDEXED_N // 2)
