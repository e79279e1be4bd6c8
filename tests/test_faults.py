"""Streaming through network faults: a real HTTP server on 127.0.0.1 that cuts responses
mid-body, answers 503 and stalls past the read timeout. Epochs come out bit-identical to
the clean ones, each retry is logged, a partial shard resumes from the byte it reached, and a
shard that always fails gives a clear error within the configured bound."""

import logging
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastmnist import FastMNISTError, FastMNISTLoader, Retry, convert
from fastmnist.bench.faulty_server import Faults, serve
from fastmnist.loading.order import worker_parts

from .conftest import INDEXED_N, batch_indices, indexed_images, write_split

FAST = Retry(attempts=30, total_s=60, timeout_s=0.5, backoff_s=0.005)


@pytest.fixture()
def faulty(tmp_path):
    """The indexed train split in tar shards of 100, served by the faulty server; yields
    (its set URL, the faults, the file:// URL of the same set)."""
    write_split(tmp_path, "train", indexed_images(INDEXED_N), np.arange(INDEXED_N) % 10)
    convert(tmp_path, tmp_path / "set", format="wds", shard_size=100, progress=False)
    server = serve(tmp_path, Faults())
    yield f"http://127.0.0.1:{server.server_address[1]}/set/", server.faults, f"file://{tmp_path}/set/"
    server.shutdown()
    server.server_close()


def test_three_epochs_through_faults_equal_the_clean_ones(faulty, caplog):
    url, faults, clean = faulty
    reference = FastMNISTLoader(clean, batch_size=64, seed=1)
    with caplog.at_level(logging.WARNING, logger="fastmnist"):
        loader = FastMNISTLoader(url, batch_size=64, seed=1, retry=FAST)
        for _ in range(3):
            batches = list(loader)
            expected = list(reference)
            assert len(batches) == len(expected) == 16
            for (x, y), (rx, ry) in zip(batches, expected, strict=True):
                assert torch.equal(x, rx) and torch.equal(y, ry)
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert set(faults.injected) == {"cut", "503", "stall"}
    assert len(retries) == sum(faults.injected.values())  # one failed attempt per fault, each logged
    assert any("HTTP error 503" in r for r in retries) and any("timed out" in r for r in retries)
    assert faults.ranges, "a cut response resumed from the byte it reached (HTTP Range)"
    assert all(start > 0 for _, start in faults.ranges)


def test_a_shard_that_always_fails_is_named_within_the_bound(faulty):
    url, faults, _ = faulty
    faults.cut = faults.unavailable = 0.0
    faults.stalled = True
    faults.broken.add("/set/train-000004.tar")
    loader = FastMNISTLoader(url, batch_size=64, shuffle=False,
                             retry=Retry(attempts=4, total_s=5, backoff_s=0.05))
    start = time.monotonic()
    with pytest.raises(FastMNISTError, match=r"train-000004.tar: failed after 4 attempts in [\d.]+ s "
                                             r"\(at most 4 in 5 s\); last error: HTTP error 503 Slow Down"):
        list(loader)
    assert time.monotonic() - start < 5
    assert faults.requests["/set/train-000004.tar"] == 4


def test_a_manifest_cut_mid_body_is_fetched_again(faulty, caplog):
    """The manifest has no size to check against but the server's Content-Length: a response
    cut in half is retried (http.client's reads end quietly there), not parsed."""
    url, faults, clean = faulty
    faults.cut = faults.unavailable = 0.0
    faults.stalled = True
    faults.cut_once.add("/set/manifest.json")
    with caplog.at_level(logging.WARNING, logger="fastmnist"):
        loader = FastMNISTLoader(url, batch_size=64, seed=1, retry=FAST)
    assert faults.injected["cut"] == 1 and faults.requests["/set/manifest.json"] == 2
    assert any("manifest.json: attempt 1 of 30 failed (connection closed after" in r.getMessage()
               for r in caplog.records)
    reference = FastMNISTLoader(clean, batch_size=64, seed=1)
    for (x, y), (rx, ry) in zip(loader, reference, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_permanent_errors_fail_at_once(faulty):
    url, faults, _ = faulty
    faults.cut = faults.unavailable = 0.0
    faults.stalled = True
    with pytest.raises(FastMNISTError, match="nowhere/manifest.json: HTTP error 404"):
        FastMNISTLoader(url + "nowhere/", retry=FAST)
    assert faults.requests["/set/nowhere/manifest.json"] == 1


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_fetch_each_shard_once_per_rank_and_epoch(faulty, workers):
    """2 ranks, each in a DataLoader with 2 or 4 persistent workers, 2 epochs: the bytes the
    server sends per rank and epoch are the rank's shards once, and the batches are the
    rank's batches without workers, collected one from each worker's part in turn."""
    url, faults, _ = faulty
    faults.cut = faults.unavailable = 0.0
    faults.stalled = True
    sizes = {f"/set/{s.file}": s.size for s in FastMNISTLoader(url).info.shards}
    for rank in range(2):
        loader = FastMNISTLoader(url, batch_size=64, seed=3, rank=rank, world_size=2, normalize=False)
        dl = DataLoader(loader, batch_size=None, num_workers=workers, persistent_workers=True)
        for epoch in range(2):
            faults.sent.clear()
            got = batch_indices(dl)
            sent = {path: n for path, n in faults.sent.items() if path.endswith(".tar")}
            share = loader.rank_order(epoch).tolist()  # what the rank's epoch visits, in order
            expected = [share[i:i + 64] for i in range(0, len(share), 64)]  # its batches without workers
            parts = [expected[first:first + count] for first, count in worker_parts(len(expected), workers)]
            assert got == [part[r] for r in range(len(parts[0])) for part in parts if r < len(part)]
            firsts = np.array([s.first for s in loader.info.shards])
            touched = {loader.info.shards[s].file for s in
                       np.searchsorted(firsts, [i for b in expected for i in b], side="right") - 1}
            assert sent == {f"/set/{name}": sizes[f"/set/{name}"] for name in touched}
