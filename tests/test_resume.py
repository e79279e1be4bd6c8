"""Elastic exact resume: a state saved by one configuration (world size, batch size,
DataLoader workers) continues the same epoch in another; every sample not yet consumed comes
exactly once (plus the documented padding), and the next epochs are the new configuration's."""

import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from fastmnist import FastMNISTError, FastMNISTLoader, convert
from fastmnist.loading.order import shard_order

from .conftest import INDEXED_N, batch_indices, indexed_images, served, write_split

REPO = Path(__file__).resolve().parents[1]
SEED = 5


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """The indexed train split as tar shards of 100, served over HTTP; yields its URL."""
    root = tmp_path_factory.mktemp("elastic_wds")
    write_split(root, "train", indexed_images(INDEXED_N), np.arange(INDEXED_N) % 10)
    convert(root, root / "set", format="wds", shard_size=100, progress=False)
    with served(root) as base:
        yield base + "set/"


def _loader(path, rank, world_size, batch_size, **kwargs):
    return FastMNISTLoader(path, batch_size=batch_size, seed=SEED, rank=rank, world_size=world_size,
                           normalize=False, prefetch=1, **kwargs)


def _first_batches(path, world_size, workers, batch_size, stop):
    """Every rank's first ``stop`` batches of epoch 0, and rank 0's state after them
    (through a StatefulDataLoader when ``workers``)."""
    seen, state = [], None
    for rank in range(world_size):
        loader = _loader(path, rank, world_size, batch_size)
        source = StatefulDataLoader(loader, batch_size=None, num_workers=workers) if workers else loader
        it = iter(source)
        seen += [i for _ in range(stop) for i in batch_indices([next(it)])[0]]
        if rank == 0:
            state = source.state_dict()
        del it
    return seen, json.loads(json.dumps(state))  # as a checkpoint file would hold it


def _rest(path, state, world_size, workers, batch_size, drop_last=False):
    """Each new rank's batches after loading ``state``, and the rank's next epoch."""
    out = []
    for rank in range(world_size):
        loader = _loader(path, rank, world_size, batch_size, drop_last=drop_last)
        loader.load_state_dict(state)
        source = DataLoader(loader, batch_size=None, num_workers=workers) if workers else loader
        rest = batch_indices(source)
        if workers:
            loader.set_epoch(state["epoch"] + 1 if "epoch" in state else 1)
        out.append((rest, batch_indices(source)))
    return out


def _check_exactly_once(order, before, ranks, world_size, drop_last=False):
    """``before`` (every old rank's consumed samples) and the new ranks' batches cover the
    epoch ``order`` exactly once, but for the padding rules of both configurations."""
    seen_before = set(before)
    assert Counter(before) - Counter(seen_before) <= Counter(order[: len(order) // 2]), \
        "old ranks repeat only the epoch's first samples (their padding)"
    rest = [s for s in order if s not in seen_before]  # what no old rank consumed, in order
    after = [i for batches, _ in ranks for b in batches for i in b]
    assert len({len(batches) for batches, _ in ranks}) == 1, "every new rank yields as many batches"
    if drop_last:
        assert len(after) == len(set(after)) and set(after) <= set(rest)
        batch = len(ranks[0][0][0])
        assert len(after) == world_size * (len(rest) // world_size // batch * batch)
    else:
        pad = math.ceil(len(rest) / world_size) * world_size - len(rest)
        assert Counter(after) == Counter(rest + rest[:pad])


@pytest.mark.parametrize("old, new", [((1, 0), (2, 0)), ((2, 0), (4, 3)), ((3, 2), (1, 1)),
                                      ((3, 0), (2, 0)), ((2, 2), (4, 0)), ((1, 2), (2, 3))])
@pytest.mark.parametrize("stop", ["first", "middle", "last"])
def test_elastic_resume_of_the_arrays(indexed_shards, old, new, stop):
    (w, workers), (w2, workers2) = old, new
    batch, batch2 = 40, 64
    batches = math.ceil(math.ceil(INDEXED_N / w) / batch)
    k = {"first": 1, "middle": batches // 2, "last": batches - 1}[stop]
    before, state = _first_batches(indexed_shards, w, workers, batch, k)
    ranks = _rest(indexed_shards, state, w2, workers2, batch2)
    order = FastMNISTLoader(indexed_shards, seed=SEED).source.order(SEED, 0, True).tolist()
    _check_exactly_once(order, before, ranks, w2)
    for rank, (_, following) in enumerate(ranks):  # then the normal epochs of the new configuration
        fresh = _loader(indexed_shards, rank, w2, batch2)
        fresh.set_epoch(1)
        assert following == batch_indices(fresh)


@pytest.mark.parametrize("old, new", [((3, 0), (2, 0)), ((1, 2), (4, 3)), ((2, 0), (1, 0))])
def test_elastic_resume_with_drop_last_and_a_smaller_batch(indexed_shards, old, new):
    (w, workers), (w2, workers2) = old, new
    before, state = _first_batches(indexed_shards, w, workers, 50, 3)
    ranks = _rest(indexed_shards, state, w2, workers2, 16, drop_last=True)
    order = FastMNISTLoader(indexed_shards, seed=SEED).source.order(SEED, 0, True).tolist()
    _check_exactly_once(order, before, ranks, w2, drop_last=True)


@pytest.mark.parametrize("old, new", [((1, 0), (2, 0)), ((3, 2), (2, 3)), ((2, 0), (4, 1))])
@pytest.mark.parametrize("stop", ["first", "last"])
def test_elastic_resume_of_streamed_shards_over_http(streamed, old, new, stop):
    (w, workers), (w2, workers2) = old, new
    batch, batch2 = 30, 45
    batches = math.ceil(math.ceil(INDEXED_N / w) / batch)
    before, state = _first_batches(streamed, w, workers, batch, 1 if stop == "first" else batches - 1)
    assert len(state["_snapshot"]["_worker_snapshots"] if workers else state["consumed"]) <= max(w, workers)
    ranks = _rest(streamed, state, w2, workers2, batch2)
    order = shard_order([100] * 10 + [3], SEED, 0, True).tolist()
    _check_exactly_once(order, before, ranks, w2)


def test_same_configuration_continues_batch_for_batch(indexed_shards, streamed):
    for path in (indexed_shards, streamed):
        for rank in range(3):
            reference = batch_indices(_loader(path, rank, 3, 25))
            loader = _loader(path, rank, 3, 25)
            it = iter(loader)
            head = [batch_indices([next(it)])[0] for _ in range(7)]
            again = _loader(path, rank, 3, 25)
            again.load_state_dict(json.loads(json.dumps(loader.state_dict())))
            assert head + batch_indices(again) == reference  # padding included


def test_every_rank_saves_the_same_state(indexed_shards):
    states = []
    for rank in range(3):
        loader = _loader(indexed_shards, rank, 3, 32)
        it = iter(loader)
        for _ in range(5):
            next(it)
        states.append(loader.state_dict())
    assert states[0] == states[1] == states[2]
    assert states[0]["consumed"] == [[0, 5 * 32 * 3]] and len(json.dumps(states[0])) < 600


@pytest.mark.parametrize("every", [1, 16])
def test_stateful_dataloader_resumes_exactly_with_2_and_3_workers(synth_shards, every):
    """torchdata's StatefulDataLoader over the loader: saved after 101 batches and resumed,
    one 60,000-sample epoch is exactly the uninterrupted one, whether it snapshots every
    batch or every 16 (the batches after the last snapshot are counted in)."""
    def make(workers):
        return StatefulDataLoader(FastMNISTLoader(synth_shards, batch_size=64, seed=2, normalize=False),
                                  batch_size=None, num_workers=workers, snapshot_every_n_steps=every)

    reference = [y.tolist() for _, y in make(0)]
    dl = make(2)
    it = iter(dl)
    head = [next(it)[1].tolist() for _ in range(101)]
    saved = json.loads(json.dumps(dl.state_dict()))
    assert saved["_steps_since_snapshot"] == 101 % every
    del it
    same = make(2)
    same.load_state_dict(saved)  # torchdata's own restore, each worker its snapshot
    assert head + [y.tolist() for _, y in same] == reference
    more = make(3)
    with pytest.raises(AssertionError):
        more.load_state_dict(saved)  # torchdata refuses another worker count itself...
        next(iter(more))
    loader = FastMNISTLoader(synth_shards, batch_size=64, seed=2, normalize=False)
    loader.load_state_dict(saved)  # ...so the state goes to the loader, then to new workers
    rest = [y.tolist() for _, y in StatefulDataLoader(loader, batch_size=None, num_workers=3)]
    assert head + rest == reference
    assert sum(map(len, head + rest)) == 60000


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("stop", [1, 21, 40])
def test_stateful_dataloader_over_streamed_shards_divided_between_workers(streamed, every, stop):
    """Streamed over HTTP, 2 workers divide the rank's run (each shard fetched once): saved
    after ``stop`` of 63 batches, torchdata's own restore continues the uninterrupted run
    batch for batch; through the loader, 3 workers finish the epoch exactly once."""
    def make(workers, loader=None):
        loader = loader or FastMNISTLoader(streamed, batch_size=16, seed=2, normalize=False)
        return StatefulDataLoader(loader, batch_size=None, num_workers=workers, snapshot_every_n_steps=every)

    reference = batch_indices(make(2))
    dl = make(2)
    it = iter(dl)
    head = batch_indices(next(it) for _ in range(stop))
    saved = json.loads(json.dumps(dl.state_dict()))
    del it
    same = make(2)
    same.load_state_dict(saved)
    assert head + batch_indices(same) == reference
    loader = FastMNISTLoader(streamed, batch_size=16, seed=2, normalize=False)
    loader.load_state_dict(saved)
    rest = batch_indices(make(3, loader))
    assert sorted(i for b in head + rest for i in b) == list(range(INDEXED_N))


@pytest.mark.parametrize("stop", [4, 20])
def test_three_workers_dividing_a_streamed_epoch_resume_in_their_order(streamed, stop):
    """3 workers divide the rank's run into 3 parts of 21 of its 63 batches, worker w taking
    part w, and the DataLoader takes a batch of each part in turn: batches 0, 21, 42, 1, 22,
    ... of the run without workers. Saved after ``stop`` batches (the next batch due from
    worker ``stop % 3``), torchdata's own restore gives the uninterrupted run's batches in
    its order."""
    def make():
        loader = FastMNISTLoader(streamed, batch_size=16, seed=2, normalize=False)
        return StatefulDataLoader(loader, batch_size=None, num_workers=3)

    alone = batch_indices(FastMNISTLoader(streamed, batch_size=16, seed=2, normalize=False))
    reference = batch_indices(make())
    assert reference == [alone[part * 21 + k] for k in range(21) for part in range(3)]
    dl = make()
    it = iter(dl)
    head = batch_indices(next(it) for _ in range(stop))
    saved = dl.state_dict()
    del it
    resumed = make()
    resumed.load_state_dict(saved)
    assert head + batch_indices(resumed) == reference


def test_a_divided_run_continued_without_workers_saves_and_resumes_exactly_once(streamed):
    """Saved while 2 workers divided the epoch, continued by the loader alone (a fresh layout
    of the rest), saved again and finished by a third loader: every sample once."""
    def make():
        return FastMNISTLoader(streamed, batch_size=16, seed=2, normalize=False)

    dl = StatefulDataLoader(make(), batch_size=None, num_workers=2)
    it = iter(dl)
    head = batch_indices(next(it) for _ in range(5))
    saved = dl.state_dict()
    del it
    alone = make()
    alone.load_state_dict(saved)
    batches = iter(alone)
    middle = batch_indices(next(batches) for _ in range(10))
    finish = make()
    finish.load_state_dict(alone.state_dict())
    seen = head + middle + batch_indices(finish)
    assert sorted(i for b in seen for i in b) == list(range(INDEXED_N))


def test_workers_that_divide_a_streamed_epoch_fetch_each_shard_once(tmp_path):
    """2 DataLoader workers dividing the rank's epoch (a part each, the boundary inside a
    shard of 100) fetch every tar shard once in all, over a counting HTTP server: the shard
    they share is fetched by one and handed to the other, and nothing of the next epoch."""
    write_split(tmp_path, "train", indexed_images(INDEXED_N), np.arange(INDEXED_N) % 10)
    convert(tmp_path, tmp_path / "set", format="wds", shard_size=100, progress=False)
    requested = []
    with served(tmp_path, requested) as base:
        loader = FastMNISTLoader(base + "set/", batch_size=16, seed=2, normalize=False)
        seen = batch_indices(DataLoader(loader, batch_size=None, num_workers=2))
    assert sorted(i for b in seen for i in b) == list(range(INDEXED_N))
    shards = sorted(path for path in requested if path.endswith(".tar"))
    assert shards == sorted({*shards}) and len(shards) == len(loader.source.info.shards) == 11


def test_the_shard_fetched_ahead_at_an_epochs_end_is_the_next_epochs_first(tmp_path):
    """Near the end of an epoch a streamed loader fetches ahead the shard the next epoch
    starts with (prefetch=1: that one only), so the next epoch's first batch waits for
    nothing: epoch 0 requests each of the 11 shards once and then exactly that shard."""
    write_split(tmp_path, "train", indexed_images(INDEXED_N), np.arange(INDEXED_N) % 10)
    convert(tmp_path, tmp_path / "set", format="wds", shard_size=100, progress=False)
    requested = []
    with served(tmp_path, requested) as base:
        # seed 0: epoch 0 ends in shard 1, epochs 1 and 2 start in shards 7 and 10
        loader = FastMNISTLoader(base + "set/", batch_size=16, seed=0, normalize=False, prefetch=1)
        assert sorted(i for b in batch_indices(loader) for i in b) == list(range(INDEXED_N))
        files = [shard.file for shard in loader.source.info.shards]
        deadline = time.monotonic() + 60  # the fetch ahead runs on its own thread
        while len([p for p in requested if p.endswith(".tar")]) <= len(files) and time.monotonic() < deadline:
            time.sleep(0.01)
        in_epoch_0 = Counter(Path(p).name for p in requested if p.endswith(".tar"))
        next_first = batch_indices([next(iter(loader))])[0][0] // 100  # the shard epoch 1 starts in
    assert in_epoch_0 - Counter(files) == Counter([files[next_first]])
    assert set(in_epoch_0) == set(files)


def test_refusals_say_what_differs(indexed_shards, tmp_path):
    state = _first_batches(indexed_shards, 1, 0, 50, 3)[1]
    with pytest.raises(FastMNISTError, match="saved with seed=5, this loader has seed=6"):
        FastMNISTLoader(indexed_shards, seed=6).load_state_dict(state)
    with pytest.raises(FastMNISTError, match="saved with shuffle=True, this loader has shuffle=False"):
        FastMNISTLoader(indexed_shards, seed=SEED, shuffle=False).load_state_dict(state)
    root = tmp_path / "other"
    write_split(root, "train", indexed_images(INDEXED_N)[::-1], np.arange(INDEXED_N) % 10)
    convert(root, root / "set", progress=False)
    with pytest.raises(FastMNISTError, match="saved with set='[0-9a-f]{32}', this loader has set="):
        FastMNISTLoader(root / "set", seed=SEED).load_state_dict(state)
    loader = FastMNISTLoader(indexed_shards, seed=SEED)
    for broken, message in [
        ({**state, "consumed": [[0, INDEXED_N + 1]]}, "consumed must be sorted, disjoint"),
        ({**state, "consumed": [[50, 60], [0, 10]]}, "consumed must be sorted"),
        ({**state, "epoch": -1}, "epoch must be a non-negative integer"),
        ({**state, "step": [*state["step"][:1], "3", *state["step"][2:]]}, "step's batches_done must be"),
        ({**state, "step": state["step"][:3]}, "step must be a list of base, batches_done"),
        ({k: v for k, v in state.items() if k != "version"}, "not a fastmnist loader state"),
        ([1, 2], "not a fastmnist loader state"),
    ]:
        with pytest.raises(FastMNISTError, match=message):
            loader.load_state_dict(broken)


def test_even_false_gives_every_test_sample_once(indexed_shards):
    loaders = [FastMNISTLoader(indexed_shards, batch_size=64, rank=r, world_size=4, even=False,
                               normalize=False, shuffle=False) for r in range(4)]
    seen = [batch_indices(loader) for loader in loaders]
    assert sorted(i for batches in seen for b in batches for i in b) == list(range(INDEXED_N))
    assert [sum(map(len, b)) for b in seen] == [251, 251, 251, 250]
    assert [len(loader) for loader in loaders] == [len(b) for b in seen] == [4, 4, 4, 4]
    uneven = [len(FastMNISTLoader(indexed_shards, batch_size=50, rank=r, world_size=4, even=False))
              for r in range(4)]
    assert uneven == [6, 6, 6, 5]  # counts may differ by one batch: no collective per batch


def test_torchrun_3_ranks_saved_resumed_by_2(indexed_shards, tmp_path):
    """A real gloo group: 3 ranks run 4 steps and rank 0 saves; a new 2-rank job loads it."""
    torchrun = Path(sys.executable).parent / "torchrun"
    out = {}
    for phase, ranks in (("save", 3), ("resume", 2)):
        out[phase] = tmp_path / f"{phase}.json"
        done = subprocess.run(
            [str(torchrun), "--standalone", f"--nproc-per-node={ranks}", str(REPO / "tests" / "ddp_job.py"),
             str(indexed_shards), "40", str(out[phase]), phase, str(tmp_path / "state.json")],
            capture_output=True, text=True, cwd=REPO, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr[-3000:]
    saved, resumed = (json.loads(out[p].read_text()) for p in ("save", "resume"))
    before = [i for r in saved for b in r["batches"] for i in b]
    assert len(before) == 3 * 4 * 40
    order = FastMNISTLoader(indexed_shards, seed=7).source.order(7, 0, True).tolist()
    _check_exactly_once(order, before, [(r["batches"], None) for r in resumed], 2)
