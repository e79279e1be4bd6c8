"""FastMNISTLoader: the seed pipeline's exact tensors, exactly once across ranks and workers,
deterministic, resumable, with clear errors."""

import json
import math
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastmnist import FastMNISTError, FastMNISTLoader, convert
from fastmnist.formats.normalize import Normalizer, lookup_table, normalize_u8, normalize_u8_numpy
from fastmnist.loading.order import LOCALITY_WINDOW, block_order, epoch_order, rank_share

from .conftest import INDEXED_N, batch_indices, decode_indices, seed_pipeline

REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")


@pytest.mark.parametrize("source", ["float32", "uint8"])
def test_bit_exact_with_the_seed_pipeline_on_real_data(real_shards, torchvision_test_root, source):
    reference = seed_pipeline(torchvision_test_root)
    loader = FastMNISTLoader(real_shards, split="test", batch_size=64, shuffle=False, images=source)
    assert len(loader) == len(reference) == 157
    count = 0
    for (x, y), (rx, ry) in zip(loader, reference, strict=True):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, rx) and torch.equal(y, ry)
        count += len(y)
    assert count == 10000


@pytest.mark.parametrize("source", ["float32", "uint8"])
def test_bit_exact_with_the_seed_pipeline_on_generated_digits(synth_root, synth_shards, source):
    """The same comparison on the generated set, so that it runs where the real digits are
    missing: torchvision's MNIST + ToTensor + Normalize over the same raw files."""
    reference = seed_pipeline(synth_root, batch_size=500)
    loader = FastMNISTLoader(synth_shards, split="test", batch_size=500, shuffle=False, images=source)
    pairs = list(zip(loader, reference, strict=True))
    assert len(pairs) == 20
    assert all(torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in pairs)


@pytest.mark.parametrize("mean, std", [(0.1307, 0.3081), (0.2860, 0.3530), (0.5, 0.25), (-1.0, 3.0)])
def test_both_normalisers_give_torchvisions_bits(mean, std):
    """Every uint8 level through the numpy and the torch normaliser, against torchvision's
    ToTensor then Normalize of the same pixels (a PIL image, as the seed pipeline has it)."""
    from PIL import Image
    from torchvision import transforms

    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    reference = tf(Image.fromarray(pixels, mode="L"))[None]
    batch = pixels[None, None]
    got = normalize_u8_numpy(batch, mean, std, out=np.empty(batch.shape, np.float32))
    assert torch.equal(torch.from_numpy(got), reference)
    assert torch.equal(normalize_u8(torch.from_numpy(batch), mean, std), reference)
    assert torch.equal(Normalizer(mean, std, torch.device("cpu"))(torch.from_numpy(batch)), reference)
    # the table a GPU looks its pixels up in, computed here on the CPU
    assert torch.equal(torch.from_numpy(lookup_table(mean, std)).view(1, 1, 16, 16), reference)


@pytest.mark.parametrize("mean, std", [(0.1307, 0.3081), (0.5, 0.25)])
def test_both_normalisers_give_v2s_bits_for_v2s_scaling(mean, std):
    """v2's ToImage + ToDtype(float32, scale=True) multiplies by 1/255 where ToTensor divides:
    the ``reciprocal`` normalisers and table against v2 itself, every uint8 level."""
    from torchvision.transforms import v2

    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    tf = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([mean], [std])])
    reference = tf(pixels)
    assert not torch.equal(reference, normalize_u8(pixels, mean, std))  # the two scalings differ here
    assert torch.equal(normalize_u8(pixels, mean, std, reciprocal=True), reference)
    assert torch.equal(Normalizer(mean, std, torch.device("cpu"), reciprocal=True)(pixels), reference)
    table = torch.from_numpy(lookup_table(mean, std, reciprocal=True))
    assert torch.equal(table.view(1, 1, 16, 16), reference)


def test_drop_in_shapes_and_len(indexed_shards):
    loader = FastMNISTLoader(indexed_shards, batch_size=64)
    batches = list(loader)
    assert len(loader) == len(batches) == math.ceil(INDEXED_N / 64)
    assert [len(y) for _, y in batches] == [64] * 15 + [INDEXED_N - 15 * 64]
    x, y = batches[0]
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (64,)
    dropped = FastMNISTLoader(indexed_shards, batch_size=64, drop_last=True)
    assert len(dropped) == len(list(dropped)) == INDEXED_N // 64



def _run_rank(path, rank, world_size, workers, drop_last=False, batch_size=50, epoch=0):
    loader = FastMNISTLoader(path, batch_size=batch_size, seed=11, drop_last=drop_last, rank=rank,
                             world_size=world_size, normalize=False)
    loader.set_epoch(epoch)
    if workers:
        return len(loader), batch_indices(DataLoader(loader, batch_size=None, num_workers=workers))
    return len(loader), batch_indices(loader)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_exactly_once_across_ranks_and_workers(indexed_shards, world_size, workers, drop_last):
    order = epoch_order(INDEXED_N, 11, 0, True).tolist()
    per_rank = INDEXED_N // world_size if drop_last else math.ceil(INDEXED_N / world_size)
    results = [_run_rank(indexed_shards, r, world_size, workers, drop_last) for r in range(world_size)]
    counts = {len(batches) for _, batches in results}
    assert counts == {results[0][0]}, "every rank yields len(loader) batches"
    assert results[0][0] == (per_rank // 50 if drop_last else math.ceil(per_rank / 50))
    seen = Counter(i for _, batches in results for batch in batches for i in batch)
    if drop_last:
        # DistributedSampler's rule, then whole batches only
        kept = [i for r, (_, b) in enumerate(results) for batch in b for i in batch]
        assert len(kept) == world_size * (per_rank // 50 * 50) and max(seen.values()) == 1
        assert set(kept) <= set(order[: per_rank * world_size])
    else:
        pad = per_rank * world_size - INDEXED_N  # repeats of the epoch's first samples
        assert seen == Counter(order + order[:pad])
    # with workers, the batches and their order are those of the single-process loader
    if workers:
        single = [_run_rank(indexed_shards, r, world_size, 0, drop_last) for r in range(world_size)]
        assert results == single


def test_rank_share_matches_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler

    for n, world, drop in [(INDEXED_N, 3, False), (INDEXED_N, 3, True), (10, 4, False), (2, 3, False)]:
        order = torch.arange(n)  # shuffle=False sampler order
        for r in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False,
                                         drop_last=drop)
            assert rank_share(order, r, world, drop).tolist() == list(sampler)
        # blocks (for streamed shards): the same padded or cut order, in W consecutive runs
        strided = [rank_share(order, r, world, drop) for r in range(world)]
        runs = [rank_share(order, r, world, drop, blocks=True) for r in range(world)]
        assert [len(x) for x in runs] == [len(x) for x in strided]
        assert torch.cat(runs).tolist() == torch.stack(strided, 1).flatten().tolist()


def test_real_gloo_group_under_torchrun(indexed_shards, tmp_path):
    out = tmp_path / "ranks.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=2", str(REPO / "tests" / "ddp_job.py"),
         str(indexed_shards), "64", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == ranks[0]["len"] == 8
    order = epoch_order(INDEXED_N, 7, 0, True).tolist()
    seen = Counter(i for r in ranks for b in r["batches"] for i in b)
    assert seen == Counter(order + order[:1])  # an odd count over 2 ranks: one sample repeated
    assert {i for b in ranks[0]["batches"] for i in b}.isdisjoint(
        {i for b in ranks[1]["batches"] for i in b} - {order[0]})


def _order_in_subprocess(path, seed, epoch) -> list[int]:
    code = ("import json; from fastmnist import FastMNISTLoader;"
            "from tests.conftest import batch_indices;"
            f"l = FastMNISTLoader({str(path)!r}, batch_size=100, seed={seed}, normalize=False);"
            f"l.set_epoch({epoch}); print(json.dumps(sum(batch_indices(l), [])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)


def test_order_is_a_pure_function_of_seed_and_epoch(indexed_shards):
    def here(seed, epoch):
        loader = FastMNISTLoader(indexed_shards, batch_size=100, seed=seed, normalize=False)
        loader.set_epoch(epoch)
        return [i for batch in batch_indices(loader) for i in batch]

    e0 = here(5, 0)
    assert sorted(e0) == list(range(INDEXED_N)) and e0 != list(range(INDEXED_N))
    assert _order_in_subprocess(indexed_shards, 5, 0) == e0
    assert here(5, 1) != e0 and sorted(here(5, 1)) == list(range(INDEXED_N))
    assert here(6, 0) != e0
    # iterating again moves to the next epoch, as DataLoader(shuffle=True) reshuffles
    loader = FastMNISTLoader(indexed_shards, batch_size=100, seed=5, normalize=False)
    assert [i for b in batch_indices(loader) for i in b] == e0
    assert [i for b in batch_indices(loader) for i in b] == here(5, 1)
    unshuffled = FastMNISTLoader(indexed_shards, batch_size=100, shuffle=False, normalize=False)
    assert [i for b in batch_indices(unshuffled) for i in b] == list(range(INDEXED_N))


RESUME = """
import json, sys, torch
from fastmnist import FastMNISTLoader
state = json.loads(sys.argv[2])
loader = FastMNISTLoader(sys.argv[1], batch_size=64, seed=3, shuffle=True)
loader.load_state_dict(state)
rest = list(loader)
body = torch.stack([x for x, _ in rest[:-1]])
torch.save([body, rest[-1][0], torch.cat([y for _, y in rest])], sys.argv[3])
"""


def test_resume_in_a_fresh_process_continues_the_epoch(synth_shards, tmp_path):
    full = FastMNISTLoader(synth_shards, batch_size=64, seed=3)
    full.set_epoch(2)
    reference = list(full)
    loader = FastMNISTLoader(synth_shards, batch_size=64, seed=3)
    loader.set_epoch(2)
    it = iter(loader)
    head = [next(it) for _ in range(300)]
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == [[0, 300 * 64]]  # a prefix of the order
    out = tmp_path / "rest.pt"
    subprocess.run([sys.executable, "-c", RESUME, str(synth_shards), json.dumps(state), str(out)],
                   cwd=REPO, check=True)
    body, last, labels = torch.load(out)
    xs = torch.cat([torch.stack([x for x, _ in head]).flatten(0, 1), body.flatten(0, 1), last])
    ys = torch.cat([torch.cat([y for _, y in head]), labels])
    assert torch.equal(xs, torch.cat([x for x, _ in reference]))
    assert torch.equal(ys, torch.cat([y for _, y in reference]))


def _state_after(path, batches, epoch=0, **kwargs):
    """The state of a loader that yielded ``batches`` batches of ``epoch``."""
    loader = FastMNISTLoader(path, normalize=False, **kwargs)
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    return loader.state_dict()


def test_resume_with_dataloader_workers(indexed_shards):
    reference = batch_indices(FastMNISTLoader(indexed_shards, batch_size=30, seed=1, normalize=False))
    loader = FastMNISTLoader(indexed_shards, batch_size=30, seed=1, normalize=False)
    loader.load_state_dict(_state_after(indexed_shards, 13, batch_size=30, seed=1))
    assert batch_indices(DataLoader(loader, batch_size=None, num_workers=2)) == reference[13:]


def test_state_survives_a_save_before_resuming(indexed_shards):
    loader = FastMNISTLoader(indexed_shards, batch_size=100, normalize=False)
    loader.load_state_dict(_state_after(indexed_shards, 4, epoch=3, batch_size=100))
    again = FastMNISTLoader(indexed_shards, batch_size=100, normalize=False)
    again.load_state_dict(loader.state_dict())  # saved again before iterating: nothing lost
    assert (again.state_dict()["epoch"], again.state_dict()["consumed"]) == (3, [[0, 400]])
    assert batch_indices(again) == batch_indices(_at_epoch(indexed_shards, 3))[4:]


def _at_epoch(path, epoch):
    loader = FastMNISTLoader(path, batch_size=100, normalize=False)
    loader.set_epoch(epoch)
    return loader


def test_state_after_a_full_epoch_points_at_the_next(indexed_shards):
    loader = FastMNISTLoader(indexed_shards, batch_size=500)
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["consumed"] == []
    list(loader)
    assert (loader.state_dict()["epoch"], loader.state_dict()["consumed"]) == (1, [])


def test_pickles_without_data(synth_shards):
    loader = FastMNISTLoader(synth_shards)
    next(iter(loader))
    assert len(pickle.dumps(loader)) < 20000


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"batch_size": -3}, "batch_size must be a positive integer"),
    ({"split": "validation"}, "no split 'validation'; this set has train, test"),
    ({"rank": 2, "world_size": 2}, "rank 2 is out of range for world_size 2"),
    ({"world_size": 0}, "world_size must be a positive integer"),
    ({"images": "float16"}, "images must be 'float32' or 'uint8'"),
])
def test_bad_arguments(indexed_shards, kwargs, message):
    with pytest.raises(FastMNISTError, match=message):
        FastMNISTLoader(indexed_shards, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_a_clear_error(indexed_shards):
    with pytest.raises(FastMNISTError, match="device='cuda' asked for, but CUDA is not available"):
        FastMNISTLoader(indexed_shards, device="cuda")
    with pytest.raises(FastMNISTError, match="pin_memory=True needs CUDA"):
        FastMNISTLoader(indexed_shards, pin_memory=True)


@pytest.mark.parametrize("bad", [10, -1, 2**40])
def test_label_array_with_a_class_the_set_lacks(tmp_path, indexed_shards, bad):
    """A labels file of the right size and shape but a class outside 0..9 (damaged or
    hostile; only ``verify=True`` hashes files) is refused before any batch, naming it."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(indexed_shards, copy)
    labels = np.load(copy / "train_labels.npy", mmap_mode="r+")
    labels[37] = bad
    labels.flush()
    del labels
    message = f"train_labels.npy: label 37: expected a class in 0..9, found {bad}"
    with pytest.raises(FastMNISTError, match=message):
        next(iter(FastMNISTLoader(copy)))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "size .* manifest says .* \\(truncated or replaced\\)"),
    (lambda p: p.unlink(), "missing shard file listed in the manifest"),
])
def test_missing_or_truncated_shard(tmp_path, indexed_shards, damage, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(indexed_shards, copy)
    damage(copy / "train_images_f32.npy")
    with pytest.raises(FastMNISTError, match=f"train_images_f32.npy: {message}"):
        FastMNISTLoader(copy)


def test_resident_cpu_and_unnormalised_modes(indexed_shards):
    base = batch_indices(FastMNISTLoader(indexed_shards, batch_size=64, normalize=False))
    resident = FastMNISTLoader(indexed_shards, batch_size=64, normalize=False, resident=True)
    assert batch_indices(resident) == base
    f32 = list(FastMNISTLoader(indexed_shards, batch_size=64, shuffle=False))
    u8 = list(FastMNISTLoader(indexed_shards, batch_size=64, shuffle=False, images="uint8"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(f32, u8, strict=True))


@needs_cuda
@pytest.mark.parametrize("mode", [{"resident": False}, {"resident": True},
                                  {"resident": False, "images": "float32"}])
def test_cuda_paths_equal_the_cpu_result(real_shards, mode):
    """Batch by batch as they arrive (each compared before the next is asked for, so a
    batch overwritten later would show): the CPU loader's bits on the GPU."""
    cpu = FastMNISTLoader(real_shards, split="test", batch_size=256, seed=4)
    gpu = FastMNISTLoader(real_shards, split="test", batch_size=256, seed=4, device="cuda", **mode)
    for (x, y), (gx, gy) in zip(cpu, gpu, strict=True):
        assert gx.is_cuda and gy.is_cuda and gx.dtype == torch.float32
        assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


@needs_cuda
def test_cpu_batches_are_pinned_when_asked(indexed_shards):
    x, y = next(iter(FastMNISTLoader(indexed_shards, pin_memory=True)))
    assert x.is_pinned() and y.is_pinned()
    x, y = next(iter(FastMNISTLoader(indexed_shards)))
    assert not x.is_pinned() and not y.is_pinned()


def test_converted_set_of_other_split_sizes(tmp_path):
    from fastmnist.conversion.synth import write_raw

    write_raw(tmp_path, 7, 3)
    convert(tmp_path, tmp_path / "s", progress=False)
    assert [len(y) for _, y in FastMNISTLoader(tmp_path / "s", batch_size=4)] == [4, 3]
    assert np.array_equal(
        np.sort(np.concatenate([y.numpy() for _, y in FastMNISTLoader(tmp_path / "s", split="test")])),
        np.sort(np.load(tmp_path / "s" / "test_labels.npy")))


WORKERS = """
import sys
from torch.utils.data import DataLoader
from fastmnist import FastMNISTLoader
loader = FastMNISTLoader(sys.argv[1], batch_size=100)
for _ in loader:
    pass
print(sum(len(y) for _, y in DataLoader(loader, batch_size=None, num_workers=2)))
"""


def test_workers_are_warned_about_once(indexed_shards):
    from fastmnist.loader import WORKER_WARNING

    done = subprocess.run([sys.executable, "-c", WORKERS, str(indexed_shards)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == str(INDEXED_N), done.stderr
    assert done.stderr.count(WORKER_WARNING) == 1  # from worker 0 only; none in-process


@pytest.mark.parametrize("batch_size", [7, 64, 1000, 1024, 1100])
def test_batches_gathered_in_groups_are_the_order_and_stay_as_yielded(indexed_shards, batch_size):
    """On the CPU about 1,024 samples are gathered per call and each batch is a slice: the
    batches are still the epoch's order cut at ``batch_size``, each contiguous, and none
    changes after it was yielded."""
    loader = FastMNISTLoader(indexed_shards, batch_size=batch_size, seed=5, normalize=False)
    kept = [(x, x.clone()) for x, _ in loader]
    order = loader.rank_order(0).tolist()
    assert [decode_indices(x) for x, _ in kept] == [order[i:i + batch_size]
                                                    for i in range(0, len(order), batch_size)]
    assert all(x.is_contiguous() and torch.equal(x, copy) for x, copy in kept)


@pytest.mark.parametrize("world_size", [1, 3])
def test_locality_order_is_exactly_once_local_and_resumable(indexed_shards, world_size):
    """Blocks of 50: each window of 8 blocks' worth of positions draws from 8 whole blocks
    (n a multiple of 50: windows start at multiples of 400); the epoch is exactly once
    across ranks; a state resumes it; the full order is another."""
    block = 50
    aligned = block_order(1000, 5, 0, True, block).tolist()
    for start in range(0, 1000, LOCALITY_WINDOW * block):
        part = aligned[start:start + LOCALITY_WINDOW * block]
        assert len({i // block for i in part}) == len(part) // block
    order = block_order(INDEXED_N, 5, 0, True, block).tolist()
    assert sorted(order) == list(range(INDEXED_N)) and order != sorted(order)
    assert block_order(INDEXED_N, 5, 1, True, block).tolist() != order
    seen = []
    for rank in range(world_size):
        loader = FastMNISTLoader(indexed_shards, batch_size=32, seed=5, normalize=False, locality=block,
                                 rank=rank, world_size=world_size)
        seen += [i for b in batch_indices(loader) for i in b]
    padding = order[:math.ceil(INDEXED_N / world_size) * world_size - INDEXED_N]
    assert Counter(seen) == Counter(order + padding)
    if world_size == 1:
        assert seen == order
    first = FastMNISTLoader(indexed_shards, batch_size=32, seed=5, normalize=False, locality=block)
    it = iter(first)
    head = [i for _ in range(5) for i in decode_indices(next(it)[0])]
    resumed = FastMNISTLoader(indexed_shards, batch_size=32, seed=5, normalize=False, locality=block)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = [i for b in batch_indices(resumed) for i in b]
    assert head + rest == order
    full = FastMNISTLoader(indexed_shards, batch_size=32, seed=5, normalize=False)
    with pytest.raises(FastMNISTError, match="state_dict was saved with order='blocks of 50', this loader "
                                             "has order='samples'"):
        full.load_state_dict(first.state_dict())


def test_locality_is_for_local_sets(indexed_shards):
    with pytest.raises(FastMNISTError, match="locality must be a positive number of samples"):
        FastMNISTLoader(indexed_shards, locality=0)
    with pytest.raises(FastMNISTError, match="locality is for local sets"):
        FastMNISTLoader("http://127.0.0.1:9/set/", locality=100)
