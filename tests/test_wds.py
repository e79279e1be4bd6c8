"""WebDataset shards: stock webdataset reads them, FastMNISTLoader reads them (locally, over
file://, pipe: and a real HTTP server on 127.0.0.1) exactly once, and damage is named."""

import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset
from torch.utils.data import DataLoader

from fastmnist import FastMNISTError, FastMNISTLoader, convert, open_shards
from fastmnist.loading.order import shard_order
from fastmnist.remote import cache

from .conftest import (
    INDEXED_N,
    batch_indices,
    decode_indices,
    indexed_images,
    seed_pipeline,
    served,
    write_split,
)


@pytest.fixture(scope="module")
def real_both(real_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_wds") / "shards"
    convert(real_root, out, format="both", shard_size=3000, progress=False)
    return out


SHARD = 200
SHARD_COUNTS = [SHARD] * (INDEXED_N // SHARD) + [INDEXED_N % SHARD]


@pytest.fixture(scope="module")
def indexed_wds(tmp_path_factory):
    """Images that encode their index; train ``INDEXED_N`` samples in tar shards of
    ``SHARD`` (6 shards)."""
    root = tmp_path_factory.mktemp("indexed_wds")
    write_split(root, "train", indexed_images(INDEXED_N), np.arange(INDEXED_N) % 10)
    write_split(root, "test", indexed_images(10), np.arange(10) % 10)
    convert(root, root / "shards", format="wds", shard_size=SHARD, progress=False)
    return root / "shards"


@pytest.fixture()
def http_server(indexed_wds, tmp_path):
    """Serve a copy of the set from a real HTTP server on 127.0.0.1; yields (base URL, dir)."""
    copy = tmp_path / "set"
    shutil.copytree(indexed_wds, copy)
    with served(tmp_path) as base:
        yield base + "set/", copy


def test_stock_webdataset_reads_the_same_samples_as_the_arrays(real_both):
    split = open_shards(real_both).split("test")
    shards = [str(split.path(s.file)) for s in split.shards]
    assert [s.count for s in split.shards] == [3000, 3000, 3000, 1000]
    samples = list(webdataset.WebDataset(shards, shardshuffle=False).decode().to_tuple("npy", "cls"))
    images = torch.from_numpy(np.stack([im for im, _ in samples]))
    labels = torch.tensor([c for _, c in samples])
    assert torch.equal(images, torch.from_numpy(np.array(split.array("images_u8")))[:, 0])
    assert torch.equal(labels, torch.from_numpy(np.array(split.array("labels"))))


@pytest.mark.parametrize("shuffle", [False, True])
def test_local_tar_shards_yield_the_arrays_batches(real_both, shuffle):
    npy = list(FastMNISTLoader(real_both, split="test", batch_size=100, shuffle=shuffle, seed=2))
    wds = list(FastMNISTLoader(real_both, split="test", batch_size=100, shuffle=shuffle, seed=2,
                               format="wds"))
    assert len(npy) == len(wds) == 100
    for (x, y), (wx, wy) in zip(npy, wds, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)


def test_wds_only_set_is_chosen_automatically(indexed_wds):
    loader = FastMNISTLoader(indexed_wds, normalize=False, shuffle=False, batch_size=INDEXED_N)
    assert loader.format == "wds"
    assert decode_indices(next(iter(loader))[0]) == list(range(INDEXED_N))
    with pytest.raises(FastMNISTError, match="split 'train' has no 'npy' data \\(it has wds\\)"):
        FastMNISTLoader(indexed_wds, format="npy")



def test_http_stream_is_one_exact_epoch(http_server, indexed_wds):
    base, _ = http_server
    streamed = batch_indices(FastMNISTLoader(base, batch_size=64, seed=3, normalize=False))
    flat = [i for b in streamed for i in b]
    assert sorted(flat) == list(range(INDEXED_N))
    assert flat == shard_order(SHARD_COUNTS, 3, 0, True).tolist()
    # normalised images equal the local read of the same samples
    local = FastMNISTLoader(indexed_wds, batch_size=INDEXED_N, shuffle=False)
    ref_x, ref_y = next(iter(local))
    for (x, y), idx in zip(FastMNISTLoader(base, batch_size=64, seed=3), streamed, strict=True):
        assert torch.equal(x, ref_x[idx]) and torch.equal(y, ref_y[idx])
    pattern = base + "train-{000000..000005}.tar"
    assert batch_indices(FastMNISTLoader(pattern, batch_size=64, seed=3, normalize=False)) == streamed


def test_streamed_batches_equal_torchvision_on_real_data(real_both, torchvision_test_root):
    reference = seed_pipeline(torchvision_test_root)
    streamed = FastMNISTLoader(f"file://{real_both}/", split="test", shuffle=False, prefetch=1)
    count = 0
    for (x, y), (rx, ry) in zip(streamed, reference, strict=True):
        assert x.dtype == torch.float32 and torch.equal(x, rx) and torch.equal(y, ry)
        count += len(y)
    assert count == 10000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")
def test_streamed_cuda_batches_equal_the_cpu_result(real_both):
    url = f"file://{real_both}/"
    cpu = list(FastMNISTLoader(url, split="test", batch_size=256, seed=4))
    gpu = FastMNISTLoader(url, split="test", batch_size=256, seed=4, device="cuda")
    assert len(cpu) == len(gpu) == 40
    for (x, y), (gx, gy) in zip(cpu, gpu, strict=True):  # each GPU batch checked as it arrives
        assert gx.is_cuda and gx.dtype == torch.float32
        assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


def test_file_and_pipe_urls(indexed_wds):
    by_file = batch_indices(FastMNISTLoader(f"file://{indexed_wds}/", batch_size=50, normalize=False))
    pipe = f"pipe:cat {indexed_wds}/train-{{000000..000005}}.tar"
    assert batch_indices(FastMNISTLoader(pipe, batch_size=50, normalize=False)) == by_file
    assert sorted(i for b in by_file for i in b) == list(range(INDEXED_N))


@pytest.mark.parametrize("world_size, workers", [(1, 2), (2, 0), (3, 2)])
def test_streamed_exactly_once_across_ranks_and_workers(indexed_wds, world_size, workers):
    url = f"file://{indexed_wds}/"
    order = shard_order(SHARD_COUNTS, 5, 0, True).tolist()
    per_rank = -(-INDEXED_N // world_size)
    seen, counts = [], set()
    for rank in range(world_size):
        loader = FastMNISTLoader(url, batch_size=40, seed=5, rank=rank, world_size=world_size,
                                 normalize=False, prefetch=1)
        source = DataLoader(loader, batch_size=None, num_workers=workers) if workers else loader
        batches = batch_indices(source)
        counts.add((len(batches), len(loader)))
        seen += [i for b in batches for i in b]
    assert counts == {(-(-per_rank // 40),) * 2}
    pad = per_rank * world_size - INDEXED_N
    assert sorted(seen) == sorted(order + order[:pad])


def test_streamed_ranks_fetch_only_the_shards_of_their_run(indexed_wds, monkeypatch):
    fetched, real_fetch = [], cache.fetch
    monkeypatch.setattr(cache, "fetch",
                        lambda url, size, **kw: fetched.append(url) or real_fetch(url, size, **kw))
    url, total = f"file://{indexed_wds}/", 0
    for rank in range(3):
        fetched.clear()
        loader = FastMNISTLoader(url, batch_size=40, seed=5, rank=rank, world_size=3,
                                 normalize=False, prefetch=1)
        touched = {f"{url}train-{i // SHARD:06d}.tar" for b in batch_indices(loader) for i in b}
        for future in loader.source.cache.pending.values():
            future.result()
        assert touched <= set(fetched) and len(set(fetched) - touched) <= 1  # + 1 for the next epoch
        total += len(touched)
    # the 6 shards, 2 shared where runs meet, 1 more for the padding that repeats the
    # epoch's first samples on the last rank: 9 at most, not 3 x 6
    assert total <= 6 + 2 + 1


def test_streaming_fetches_each_shard_once_per_epoch_and_holds_few(indexed_wds, monkeypatch):
    fetched, real_fetch = Counter(), cache.fetch
    monkeypatch.setattr(cache, "fetch",
                        lambda url, size, **kw: fetched.update([url]) or real_fetch(url, size, **kw))
    # unshuffled, the 6 shards are visited in turn, so none stays held from one visit to the next
    loader = FastMNISTLoader(f"file://{indexed_wds}/", batch_size=1, shuffle=False, normalize=False)
    beyond = []
    for _ in range(3):
        for _ in loader:
            held = loader.source.cache
            beyond.append(len(held.loaded) + len(held.pending) - len(set(held.in_use)))
    for future in held.pending.values():
        future.result()
    shard_urls = [f"file://{indexed_wds}/train-{s:06d}.tar" for s in range(6)]
    # each shard once per epoch, and the next epoch's first two fetched ahead
    assert fetched == Counter(shard_urls * 3 + shard_urls[:2])
    assert max(beyond) == 2  # the shards in use plus at most `prefetch` more


def test_streamed_resume_continues_the_epoch(indexed_wds):
    url = f"file://{indexed_wds}/"
    reference = batch_indices(FastMNISTLoader(url, batch_size=30, seed=9, normalize=False))
    loader = FastMNISTLoader(url, batch_size=30, seed=9, normalize=False)
    it = iter(loader)
    head = [decode_indices(next(it)[0]) for _ in range(11)]
    fresh = FastMNISTLoader(url, batch_size=30, seed=9, normalize=False)
    fresh.load_state_dict(loader.state_dict())
    assert head + batch_indices(fresh) == reference


def _damaged_copy(indexed_wds, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(indexed_wds, copy)
    damage(copy / "train-000002.tar")
    return copy


def _flip(offset):
    def damage(path):
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))
    return damage


@pytest.mark.parametrize("damage, local_error, stream_error", [
    (lambda p: p.write_bytes(p.read_bytes()[:100_000]), "size 100000 bytes, manifest says",
     "truncated: 100000 bytes, the manifest says"),
    (lambda p: p.unlink(), "missing shard file listed in the manifest", "file not found"),
    (_flip(2560 * 7 + 100), None, "sample 7: unexpected bytes in the .cls member header at offset 100"),
    (_flip(2560 * 7 + 1700), None, None),  # an image byte: only the checksum can tell
])
def test_damaged_shards_are_named(indexed_wds, tmp_path, damage, local_error, stream_error):
    copy = _damaged_copy(indexed_wds, tmp_path, damage)
    name = "train-000002.tar"
    if local_error:
        with pytest.raises(FastMNISTError, match=f"{name}: {local_error}"):
            FastMNISTLoader(copy)
    else:
        with pytest.raises(FastMNISTError, match=f"{name}: sha256 differs"):
            FastMNISTLoader(copy, verify=True)
    loader = FastMNISTLoader(f"file://{copy}/", verify=stream_error is None, normalize=False)
    with pytest.raises(FastMNISTError, match=f"{name}: {stream_error or 'sha256 differs'}"):
        list(loader)


def test_http_errors_and_incomplete_listings_are_named(http_server):
    base, served = http_server
    (served / "train-000004.tar").unlink()
    with pytest.raises(FastMNISTError, match="train-000004.tar: HTTP error 404"):
        list(FastMNISTLoader(base, normalize=False))
    with pytest.raises(FastMNISTError, match="train-000005.tar: train shard missing from the listing"):
        FastMNISTLoader(base + "train-{000000..000004}.tar")
    with pytest.raises(FastMNISTError, match="test-000000.tar: not a train shard"):
        FastMNISTLoader([base + "train-000000.tar", base + "test-000000.tar"])
    with pytest.raises(FastMNISTError, match="manifest.json: HTTP error 404"):
        FastMNISTLoader(base + "nowhere/")


def test_a_split_of_one_shard_streams_from_that_shards_url(http_server):
    """A split stored in one tar shard, given by that shard's URL (alone, or as a list of
    one): its manifest is the one beside it, its batches those of the whole set's URL."""
    base, _ = http_server
    whole = list(FastMNISTLoader(base, split="test", normalize=False, shuffle=False))
    for location in (base + "test-000000.tar", [base + "test-000000.tar"]):
        batches = list(FastMNISTLoader(location, split="test", normalize=False, shuffle=False))
        assert len(whole) > 0
        for (x, y), (x0, y0) in zip(batches, whole, strict=True):
            assert torch.equal(x, x0) and torch.equal(y, y0)
