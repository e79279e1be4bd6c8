"""Object stores through fsspec, against a real S3 API server (moto's standalone server,
started here on 127.0.0.1): ``fastmnist push`` publishes a set with the manifest last,
``FastMNISTLoader("s3://...")`` streams it over 2 ranks x 2 workers exactly once and
bit-identical to the local set, ``verify=True`` catches a shard overwritten in the bucket,
and a push killed mid-upload never leaves a manifest that lists a missing or stale file."""

import logging
import signal
import subprocess
import sys
from collections import Counter

import fsspec
import numpy as np
import pytest
import torch
from moto.server import ThreadedMotoServer
from torch.utils.data import DataLoader

from fastmnist import FastMNISTError, FastMNISTLoader, convert, push

from .conftest import INDEXED_N, batch_indices, indexed_images, write_split


@pytest.fixture(scope="module")
def s3():
    """A real S3 API server on 127.0.0.1 with one bucket; yields the storage options."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "fastmnist", "secret": "fastmnist"}
    fsspec.filesystem("s3", **options).mkdir("fastmnist-test")
    yield options
    server.stop()


@pytest.fixture(scope="module")
def indexed_set(tmp_path_factory):
    """The indexed train split in both formats, tar shards of 100 samples."""
    root = tmp_path_factory.mktemp("cloud")
    write_split(root, "train", indexed_images(INDEXED_N), np.arange(INDEXED_N) % 10)
    convert(root, root / "set", format="both", shard_size=100, progress=False)
    return root / "set"


def _epoch(path, rank, **options):
    """Rank ``rank`` of 2's epoch 0 through a DataLoader with 2 workers: (x, y) batches."""
    loader = FastMNISTLoader(path, batch_size=64, seed=4, rank=rank, world_size=2, normalize=False, **options)
    return list(DataLoader(loader, batch_size=None, num_workers=2))


def test_push_then_stream_2_ranks_2_workers_exactly_once_and_bit_identical(s3, indexed_set):
    done = push(indexed_set, "s3://fastmnist-test/exact/", s3, progress=False)
    assert sorted(done.uploaded) == sorted(p.name for p in indexed_set.iterdir() if p.name != "manifest.json")
    seen = []
    for rank in range(2):
        remote = _epoch("s3://fastmnist-test/exact/", rank, storage_options=s3)
        local = _epoch(f"file://{indexed_set}/", rank)
        assert len(remote) == len(local)
        for (x, y), (x_local, y_local) in zip(remote, local, strict=True):
            assert torch.equal(x, x_local) and torch.equal(y, y_local)
        seen += [i for batch in batch_indices(remote) for i in batch]
    pixels = np.load(indexed_set / "train_images_u8.npy")  # the local set, sample by sample
    x, _ = _epoch("s3://fastmnist-test/exact/", 0, storage_options=s3)[0]
    assert np.array_equal(x.numpy(), pixels[batch_indices([(x, None)])[0]])
    assert set(seen) == set(range(INDEXED_N))
    padding = Counter(seen) - Counter(range(INDEXED_N))
    assert sum(padding.values()) == -INDEXED_N % 2  # 1003 over 2 ranks: one sample repeated


def test_verify_catches_a_shard_overwritten_in_the_bucket_and_push_repairs_only_it(s3, indexed_set):
    url = "s3://fastmnist-test/overwritten/"
    push(indexed_set, url, s3, progress=False)
    fs = fsspec.filesystem("s3", **s3)
    shard = "fastmnist-test/overwritten/train-000003.tar"
    data = bytearray(fs.cat_file(shard))
    data[2000] ^= 0xFF  # a pixel of the first sample: the tar is still well-formed
    fs.pipe_file(shard, bytes(data))
    FastMNISTLoader(url, storage_options=s3, normalize=False).state_dict()  # opening reads no shard
    with pytest.raises(FastMNISTError, match=r"train-000003\.tar: sha256 differs"):
        for _ in FastMNISTLoader(url, storage_options=s3, verify=True, normalize=False, shuffle=False):
            pass
    again = push(indexed_set, url, s3, progress=False)
    assert again.uploaded == ["train-000003.tar"] and again.bytes_uploaded == len(data)
    assert sum(len(y) for _, y in FastMNISTLoader(url, storage_options=s3, verify=True)) == INDEXED_N
    assert push(indexed_set, url, s3, progress=False).uploaded == []


KILL_PUSH = """
import os, signal, sys, tqdm
update = tqdm.tqdm.update
def killing_update(self, n=1):
    update(self, n)
    if self.n >= float(sys.argv[1]) * self.total:
        os.kill(os.getpid(), signal.SIGKILL)
tqdm.tqdm.update = killing_update
from fastmnist.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("at", [0.3, 1.0])
@pytest.mark.parametrize("previous", [False, True])
def test_push_killed_mid_upload_leaves_no_manifest_listing_a_missing_file(s3, indexed_set, tmp_path, at,
                                                                          previous):
    """SIGKILL when 30% of the bytes are up, or all of them but before the manifest, onto an
    empty prefix or over another set: no manifest is there to list a missing or stale file
    (a reader gets a clear error); the re-run uploads what is missing and completes."""
    url = f"s3://fastmnist-test/killed-{at}-{previous}/"
    if previous:  # another conversion of other data already published there
        write_split(tmp_path, "train", indexed_images(500)[::-1].copy(), np.arange(500) % 10)
        convert(tmp_path, tmp_path / "old", format="both", shard_size=100, progress=False)
        push(tmp_path / "old", url, s3, progress=False)
    options = [f"-o{k}={v}" for k, v in s3.items()]
    done = subprocess.run([sys.executable, "-c", KILL_PUSH, str(at), "push", str(indexed_set), url, *options],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    fs = fsspec.filesystem("s3", **s3)
    fs.invalidate_cache()
    assert not fs.exists(url + "manifest.json")
    with pytest.raises(FastMNISTError, match="not found"):
        FastMNISTLoader(url, storage_options=s3)
    finished = push(indexed_set, url, s3, progress=False)
    if at < 1.0:
        assert finished.uploaded and finished.kept, "the re-run keeps what the killed push uploaded"
    else:
        assert finished.uploaded == [], "every data file was up: the re-run only writes the manifest"
    loader = FastMNISTLoader(url, storage_options=s3, normalize=False, verify=True)
    assert sorted(i for batch in batch_indices(loader) for i in batch) == list(range(INDEXED_N))


def test_memory_and_local_urls_and_clear_errors(s3, indexed_set, monkeypatch, tmp_path):
    for url in ("memory://fastmnist/set", f"file://{tmp_path}/new/dir"):
        push(indexed_set, url, progress=False)
        loader = FastMNISTLoader(url + "/", normalize=False, verify=True)
        assert sorted(i for batch in batch_indices(loader) for i in batch) == list(range(INDEXED_N))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = {"endpoint_url": s3["endpoint_url"]}
    with pytest.raises(FastMNISTError, match=r"manifest\.json: .*credentials.*storage_options"):
        push(indexed_set, "s3://fastmnist-test/nocreds/", {**endpoint, "skip_instance_cache": True},
             progress=False)
    push(indexed_set, "s3://fastmnist-test/anon/", s3, progress=False)
    with pytest.raises(FastMNISTError, match=r"anon/manifest\.json: access denied"):
        FastMNISTLoader("s3://fastmnist-test/anon/", storage_options={**endpoint, "anon": True})
    with pytest.raises(FastMNISTError, match="no such bucket"):
        push(indexed_set, "s3://no-such-bucket/set/", s3, progress=False)
    with pytest.raises(FastMNISTError, match=r"fastmnist\[cloud\]"):
        FastMNISTLoader("gs://fastmnist-test/set/")
    with pytest.raises(FastMNISTError, match="Protocol not known"):
        FastMNISTLoader("nosuchscheme://fastmnist-test/set/")
