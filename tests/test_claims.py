"""Claims checked against references the project did not write: torch's DistributedSampler
for the rank split at counts a world size divides, distinct orders for every (seed, epoch),
augmentation steps drawing independently of each other, and readers pinned to the set they
opened when it is replaced before its arrays are mapped; the plan's interval arithmetic
against explicit sets of positions, and a state's bounds at their edges."""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from fastmnist import FastMNISTError, FastMNISTLoader, convert, open_shards
from fastmnist.loading import plan
from fastmnist.loading.order import (
    LOCALITY_WINDOW,
    block_order,
    delivered,
    epoch_order,
    rank_share,
    runs,
    worker_parts,
)

from .conftest import INDEXED_N, batch_indices, decode_indices, indexed_images, write_split


@pytest.mark.parametrize("count", [1, 1000, 1002, INDEXED_N])  # one; divided by 2 and 4; by 2 and 3; by none
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [1, 50])  # 1: a dropped batch cannot hide a sample too many
def test_rank_split_is_distributed_samplers_at_every_count(indexed_shards, count, world_size, drop_last,
                                                           batch_size):
    """Each rank's samples are those DistributedSampler(shuffle=False) assigns to it over the
    epoch's sequence, len() is the batches it yields, and every rank yields as many."""
    indices = list(range(count))  # a subset of the indexed set makes the count
    whole = [i for b in batch_indices(FastMNISTLoader(indexed_shards, batch_size=50, normalize=False,
                                                      indices=indices, seed=2)) for i in b]
    lengths = set()
    for rank in range(world_size):
        loader = FastMNISTLoader(indexed_shards, batch_size=batch_size, normalize=False, indices=indices,
                                 seed=2, rank=rank, world_size=world_size, drop_last=drop_last)
        sampler = DistributedSampler(range(count), world_size, rank, shuffle=False, drop_last=drop_last)
        batches = batch_indices(loader)
        kept = len(sampler) // batch_size * batch_size if drop_last else None  # the last short batch
        assert [i for b in batches for i in b] == [whole[p] for p in sampler][:kept]
        assert len(loader) == len(batches) and loader.samples_per_rank == len(sampler)
        lengths.add(len(batches))
    assert len(lengths) == 1


@pytest.mark.parametrize("count", [1, 1000, 1002, INDEXED_N])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_uneven_split_gives_each_rank_its_strided_share_and_says_so(indexed_shards, count, world_size):
    """even=False: rank r takes positions r, r + W, ... of the epoch's sequence, no padding,
    nothing dropped; len() and samples_per_rank say what it then yields."""
    indices = list(range(count))
    whole = [i for b in batch_indices(FastMNISTLoader(indexed_shards, batch_size=50, normalize=False,
                                                      indices=indices, seed=2)) for i in b]
    for rank in range(world_size):
        loader = FastMNISTLoader(indexed_shards, batch_size=50, normalize=False, indices=indices, seed=2,
                                 rank=rank, world_size=world_size, even=False)
        batches = batch_indices(loader)
        assert [i for b in batches for i in b] == whole[rank::world_size]
        assert len(loader) == len(batches) and loader.samples_per_rank == len(whole[rank::world_size])


def test_every_seed_and_epoch_has_its_own_order():
    """No two (seed, epoch) pairs of a 21 x 21 grid share an order (a shuffle keyed by
    seed + epoch would make (5, 1) and (6, 0) the same)."""
    orders = {(s, e): tuple(epoch_order(1000, s, e, True)[:20].tolist())
              for s in range(21) for e in range(21)}
    assert len(set(orders.values())) == len(orders)
    assert orders[(5, 1)] != orders[(6, 0)]


def test_augmentation_steps_draw_independently(indexed_shards):
    """Two steps of one transform, and two draws within a step, are uncorrelated over 20
    epochs of 1,003 samples (steps drawing from the same numbers correlate near 1)."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.RandomAffine(30, translate=(0.1, 0.1), scale=(0.8, 1.2),
                                                     shear=(-10, 10, -5, 5)),
                             transforms.RandomCrop(28, padding=4), transforms.RandomRotation(45),
                             transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    loader = FastMNISTLoader(indexed_shards, transform=tf)
    draws = {}
    for epoch in range(20):
        affine, crop, rotation = loader.augmentation_params(epoch, torch.arange(INDEXED_N))
        for name, values in (("affine angle", affine["angle"]), ("affine dx", affine["translate"][:, 0]),
                             ("affine dy", affine["translate"][:, 1]), ("affine scale", affine["scale"]),
                             ("affine shear x", affine["shear"][:, 0]),
                             ("affine shear y", affine["shear"][:, 1]),
                             ("crop top", crop["top"]), ("crop left", crop["left"]),
                             ("rotation", rotation["angle"])):
            draws.setdefault(name, []).append(values.double().numpy())
    names = list(draws)
    matrix = np.corrcoef(np.stack([np.concatenate(draws[n]) for n in names]))
    bound = 4 / np.sqrt(20 * INDEXED_N)  # 4 standard errors of a correlation of 0
    off_diagonal = np.abs(matrix[~np.eye(len(names), dtype=bool)])
    assert off_diagonal.max() < bound, dict(zip(names, matrix.round(3).tolist(), strict=True))


def test_a_reader_keeps_the_set_it_opened_when_it_is_replaced_before_mapping(tmp_path):
    """Open a loader, `convert --force` other digits into the same directory, then take the
    first batch: the pixels are the opened set's (nothing is mapped until then), never the
    new set's under the old manifest."""
    root = tmp_path / "raw"
    write_split(root, "train", indexed_images(300), np.arange(300) % 10)
    write_split(root, "test", indexed_images(10), np.arange(10) % 10)
    convert(root, tmp_path / "set", progress=False)
    loader = FastMNISTLoader(tmp_path / "set", batch_size=300, shuffle=False, normalize=False)
    other = indexed_images(300)[::-1].copy()  # the same digits in the opposite order
    write_split(root, "train", other, (np.arange(300) % 10)[::-1].copy())
    convert(root, tmp_path / "set", progress=False, force=True)
    x, y = next(iter(loader))
    assert decode_indices(x) == list(range(300)) and y.tolist() == (np.arange(300) % 10).tolist()
    fresh = next(iter(FastMNISTLoader(tmp_path / "set", batch_size=300, shuffle=False, normalize=False)))
    assert decode_indices(fresh[0]) == list(range(299, -1, -1))


def test_a_split_maps_the_version_it_was_opened_from_or_refuses(tmp_path):
    """``open_shards(...).split(...)`` then a replacing conversion, then ``array()``: the
    opened version's labels, or an error saying the set was replaced; never the new labels
    under the old manifest."""
    root = tmp_path / "raw"
    labels = np.arange(300) % 10
    write_split(root, "train", indexed_images(300), labels)
    write_split(root, "test", indexed_images(10), np.arange(10) % 10)
    convert(root, tmp_path / "set", progress=False)
    split = open_shards(tmp_path / "set").split("train")
    write_split(root, "train", indexed_images(300), (labels + 1) % 10)
    convert(root, tmp_path / "set", progress=False, force=True)
    try:
        mapped = np.asarray(split.array("labels"))
    except FastMNISTError as e:
        assert "the set was replaced after it was opened" in str(e)
    else:
        assert mapped.tolist() == labels.tolist()


def test_a_split_whose_set_was_deleted_since_it_was_opened_says_so(tmp_path):
    """The set's directory removed (its path gone) after ``open_shards``: mapping an array
    of the opened split says the set was replaced and to open it again."""
    root = tmp_path / "raw"
    write_split(root, "train", indexed_images(30), np.arange(30) % 10)
    convert(root, tmp_path / "set", progress=False)
    split = open_shards(tmp_path / "set").split("train")
    shutil.rmtree(tmp_path / "set")
    with pytest.raises(FastMNISTError, match="train_labels.npy: the set was replaced after it was opened"):
        split.array("labels")


@pytest.mark.parametrize("seed", range(6))
def test_locality_order_shuffles_the_blocks_and_mixes_each_window(seed):
    """block_order (the order for sets larger than the page cache): each window of
    LOCALITY_WINDOW blocks is read as one, its samples mixed across all its blocks, and the
    blocks come in a shuffled order (not ascending, not the same for every seed)."""
    n, block = 1000, 10
    order = block_order(n, seed, 0, True, block).numpy()
    assert sorted(order) == list(range(n))
    window = LOCALITY_WINDOW * block
    blocks_seen = []
    for start in range(0, n, window):
        part = order[start:start + window] // block
        assert len(set(part)) == min(LOCALITY_WINDOW, -(-(n - start) // block))
        if len(set(part)) > 1:  # the window's first samples already come from several blocks
            assert len(set(part[:block])) > 1
        if len(part) == window:  # a whole window is not read in order
            assert abs(np.corrcoef(np.arange(window), order[start:start + window])[0, 1]) < 0.5
        blocks_seen += sorted(set(part))
    firsts = [block_order(n, s, 0, True, block)[0].item() // block for s in range(20)]
    assert len(set(firsts)) >= 8  # the first block read differs with the seed
    assert blocks_seen != sorted(blocks_seen)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_an_empty_order_splits_into_empty_shares(world_size, drop_last):
    assert len(block_order(0, 0, 0, True, 10)) == 0
    for rank in range(world_size):
        assert len(rank_share(torch.arange(0), rank, world_size, drop_last)) == 0
        assert len(rank_share(torch.arange(0), rank, world_size, drop_last, blocks=True)) == 0


@pytest.mark.parametrize("n", [0, 1, 7, 1000, 1003])
@pytest.mark.parametrize("world_size", [1, 3, 8])
def test_uneven_runs_tile_the_order_as_array_split_does(n, world_size):
    """``even=False`` with consecutive runs (streamed shards): rank r's run is numpy's
    ``array_split`` part r, the longer parts first, together the whole order once."""
    sizes = [len(part) for part in np.array_split(np.arange(n), world_size)]
    assert runs(n, world_size, False, even=False) == [(sum(sizes[:r]), size) for r, size in enumerate(sizes)]
    order = torch.arange(n)
    shares = [rank_share(order, r, world_size, False, blocks=True, even=False) for r in range(world_size)]
    assert torch.equal(torch.cat(shares), order)


class _Parts(torch.utils.data.IterableDataset):
    """Worker w yields ``(w, k)`` for k in its part of ``worker_parts(batches, workers)``."""

    def __init__(self, batches: int, workers: int):
        self.parts = worker_parts(batches, workers)

    def __iter__(self):
        w = torch.utils.data.get_worker_info().id
        yield from ((w, k) for k in range(self.parts[w][1]))


@pytest.mark.parametrize("batches, workers", [(7, 3), (10, 4), (5, 5), (2, 3), (11, 2)])
def test_delivered_counts_what_a_real_dataloader_has_yielded(batches, workers):
    """What ``delivered`` says each worker's part has given after ``done`` batches, against
    torch's own DataLoader collecting from workers whose parts are ``worker_parts``."""
    seen = list(DataLoader(_Parts(batches, workers), batch_size=None, num_workers=workers))
    assert len(seen) == batches
    for done in range(batches + 1):
        counts = [sum(1 for w, _ in seen[:done] if w == p) for p in range(workers)]
        assert delivered(done, batches, workers) == counts, done


def _positions(intervals) -> list[int]:
    return [p for a, b in intervals for p in range(a, b)]


_interval_lists = st.integers(0, 60).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n), st.integers(0, n)).filter(lambda ab: ab[0] < ab[1])
                         .map(list), max_size=6)))


@settings(max_examples=300, deadline=None)
@given(_interval_lists, st.integers(0, 70), st.integers(0, 70))
def test_interval_arithmetic_is_set_arithmetic_on_positions(case, first, last):
    """merge, gaps, count, pick and covered against the same operations on explicit sets
    of positions (the plan's whole account of what an epoch consumed)."""
    n, raw = case
    def positions(intervals) -> list[int]:  # of Intervals as the plan defines them: sorted, apart, non-empty
        assert all(a < b for a, b in intervals)
        assert all(b < c for (_, b), (c, _) in zip(intervals, intervals[1:], strict=False))
        return _positions(intervals)

    consumed = plan.merge(raw)
    taken = sorted(set(_positions(raw)))
    assert positions(consumed) == taken
    rest = [p for p in range(n) if p not in set(taken)]
    assert positions(plan.gaps(consumed, n)) == rest and plan.count(consumed) == len(taken)
    assert positions(plan.pick(consumed, n, first, last)) == rest[first:last]
    spans = [(first, last), (last // 2, last)]
    assert positions(plan.covered(consumed, n, spans)) == sorted(set(taken) | set(rest[first:last])
                                                                 | set(rest[last // 2:last]))


def _state(indexed_shards):
    loader = FastMNISTLoader(indexed_shards, batch_size=10, normalize=False, seed=3)
    it = iter(loader)
    next(it)
    return loader, loader.state_dict()


def test_a_state_saved_in_this_format_loads_and_continues(indexed_shards):
    """Version 2 is the format every release since it writes: such a state loads, and the
    rest is the uninterrupted epoch's."""
    loader, state = _state(indexed_shards)
    assert state["version"] == 2
    whole = sum(batch_indices(FastMNISTLoader(indexed_shards, batch_size=10, normalize=False, seed=3)), [])
    resumed = FastMNISTLoader(indexed_shards, batch_size=10, normalize=False, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert sum(batch_indices(resumed), []) == whole[10:]


@pytest.mark.parametrize("key, least, most", [  # the documented bounds, not read from the module
    ("batches_done", 0, 1 << 40), ("anchor", 0, 1 << 40), ("batch_size", 1, 1 << 24),
    ("world_size", 1, 1 << 16), ("workers", 1, 1 << 10)])
def test_a_states_step_is_bounded_exactly(indexed_shards, key, least, most):
    """Each bound on a state's step admits its value and refuses one beyond it, before
    anything is computed from it (a state is hostile input)."""
    loader, state = _state(indexed_shards)
    position = plan.STEP_FIELDS.index(key)
    expected = {k: state[k] for k in loader._plan.identity}
    for value, refused in ((least, False), (least - 1, True), (most, False), (most + 1, True)):
        step = list(state["step"])
        step[position] = value
        if refused:
            with pytest.raises(FastMNISTError, match=f"step's {key} must be an integer in .*{most}"):
                plan.check_state({**state, "step": step}, expected, INDEXED_N)
        else:
            assert plan.check_state({**state, "step": step}, expected, INDEXED_N)["step"][key] == value


def test_a_states_intervals_are_bounded_and_typed(indexed_shards):
    loader, state = _state(indexed_shards)
    expected = {k: state[k] for k in loader._plan.identity}
    n = 2 * 65536 + 2
    most = [[2 * k, 2 * k + 1] for k in range(65536)]  # the documented bound, not read from the module
    assert plan.check_state({**state, "consumed": most}, expected, n)["consumed"] == most
    for bad in (most + [[n - 1, n]], [[0, 1.5]], [[True, 2]], [[0]], [0, 1], [["0", "1"]], "[[0, 1]]"):
        with pytest.raises(FastMNISTError, match="consumed must be sorted, disjoint"):
            plan.check_state({**state, "consumed": bad}, expected, n)
    for drop_last, even in (("yes", True), (True, "yes"), (1, True)):
        step = dict(zip(plan.STEP_FIELDS, state["step"], strict=True))
        step |= {"drop_last": drop_last, "even": even}
        with pytest.raises(FastMNISTError, match="drop_last and even must be true or false"):
            plan.check_state({**state, "step": list(step.values())}, expected, INDEXED_N)


def test_a_refused_states_value_is_shown_whole_up_to_80_characters(indexed_shards):
    loader, state = _state(indexed_shards)
    expected = {k: state[k] for k in loader._plan.identity}
    for text, shown in (("e" * 78, repr("e" * 78)), ("e" * 79, repr("e" * 79)[:77] + "...")):
        with pytest.raises(FastMNISTError) as refused:
            plan.check_state({**state, "epoch": text}, expected, INDEXED_N)
        assert str(refused.value).endswith(f"got {shown}")


@pytest.mark.parametrize("persistent", [False, True])
def test_each_pass_of_a_dataloader_runs_the_next_epoch(indexed_shards, persistent):
    """Passes of DataLoader(loader, num_workers=2) run epochs 0, 1, 2 as iterating the loader
    directly does, whether its workers are made anew each pass or persist; and the loader
    then knows three epochs ran."""
    def make():
        return FastMNISTLoader(indexed_shards, batch_size=50, normalize=False, seed=8)

    direct = make()
    expected = [batch_indices(direct) for _ in range(3)]
    loader = make()
    workers = DataLoader(loader, batch_size=None, num_workers=2, persistent_workers=persistent)
    assert [batch_indices(workers) for _ in range(3)] == expected
    assert len({tuple(sum(e, [])) for e in expected}) == 3 and loader.epoch == 3


def test_a_state_taken_after_a_whole_epoch_starts_the_next(indexed_shards):
    def make():
        return FastMNISTLoader(indexed_shards, batch_size=100, normalize=False, seed=5)

    direct = make()
    first, second = batch_indices(direct), batch_indices(direct)
    loader = make()
    assert batch_indices(loader) == first
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == []
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and batch_indices(resumed) == second


@pytest.mark.parametrize("workers", [1, 2])
def test_a_snapshot_counted_to_the_epochs_last_batch_starts_the_next(indexed_shards, workers):
    """A StatefulDataLoader's state whose worker snapshots are from the epoch's start and
    whose steps since then reach its last batch (the iterator not yet ended), loaded into a
    loader: it runs the next epoch, not an empty rest of this one."""
    def make():
        return FastMNISTLoader(indexed_shards, batch_size=100, normalize=False, seed=5)

    direct = make()
    first, second = batch_indices(direct), batch_indices(direct)
    dl = StatefulDataLoader(make(), batch_size=None, num_workers=workers, snapshot_every_n_steps=1000)
    batches = iter(dl)
    assert batch_indices(next(batches) for _ in range(len(first))) == first
    state = dl.state_dict()
    assert state["_steps_since_snapshot"] == len(first)
    resumed = make()
    resumed.load_state_dict(state)
    assert batch_indices(resumed) == second
    smaller = FastMNISTLoader(indexed_shards, batch_size=50, normalize=False, seed=5)
    smaller.load_state_dict(state)  # another layout: the whole epoch consumed, so the next
    assert sum(batch_indices(smaller), []) == sum(second, [])


def test_a_stateful_dataloaders_state_without_workers_loads_into_the_loader(indexed_shards):
    """torchdata's state of a StatefulDataLoader without workers (the loader's own state under
    "dataset_state"), loaded into a fresh loader: the rest of the epoch, no batch skipped."""
    def make():
        return FastMNISTLoader(indexed_shards, batch_size=100, normalize=False, seed=5)

    reference = batch_indices(make())
    dl = StatefulDataLoader(make(), batch_size=None, num_workers=0)
    batches = iter(dl)
    assert batch_indices(next(batches) for _ in range(3)) == reference[:3]
    resumed = make()
    resumed.load_state_dict(dl.state_dict())
    assert batch_indices(resumed) == reference[3:]


@pytest.mark.parametrize("trim", [False, True])
def test_a_snapshot_taken_at_the_last_step_resumes_there(indexed_shards, trim):
    """A StatefulDataLoader state with a snapshot at its last batch (no steps since, or the
    count left out), loaded into a loader: the rest of the run, no batch skipped or refused."""
    def make():
        return FastMNISTLoader(indexed_shards, batch_size=100, normalize=False, seed=5)

    reference = batch_indices(make())
    dl = StatefulDataLoader(make(), batch_size=None, num_workers=2, snapshot_every_n_steps=1)
    batches = iter(dl)
    assert batch_indices(next(batches) for _ in range(4)) == reference[:4]
    state = dl.state_dict()
    assert state["_steps_since_snapshot"] == 0
    if trim:
        del state["_steps_since_snapshot"]
    resumed = make()
    resumed.load_state_dict(state)
    assert batch_indices(resumed) == reference[4:]


def test_a_fingerprint_names_the_identity_not_the_order_of_its_keys():
    """The digest a state and a selection are checked by: equal for the same keys and values
    in any order, different for another value."""
    identity = {"set": "ab" * 16, "split": "train", "seed": 5, "shuffle": True}
    shuffled = dict(reversed(list(identity.items())))
    assert plan.fingerprint(identity) == plan.fingerprint(shuffled)
    assert plan.fingerprint(identity) != plan.fingerprint({**identity, "seed": 6})


def test_set_epoch_keeps_a_loaded_state_of_that_epoch_and_drops_another(indexed_shards):
    def make():
        return FastMNISTLoader(indexed_shards, batch_size=100, normalize=False, seed=5)

    loader = make()
    loader.set_epoch(2)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    whole_two = batch_indices(_epoch_of(make(), 2))
    same = make()
    same.load_state_dict(state)
    same.set_epoch(2)  # as a DistributedSampler loop calls it: the saved position stays
    assert batch_indices(head) + batch_indices(same) == whole_two
    other = make()
    other.load_state_dict(state)
    other.set_epoch(3)  # another epoch: the saved position is dropped
    assert batch_indices(other) == batch_indices(_epoch_of(make(), 3))


def _epoch_of(loader, epoch: int):
    loader.set_epoch(epoch)
    return list(loader)


def test_the_epochs_workers_ran_are_recorded_from_iteration_and_epoch_zero():
    ran = plan.WorkerEpochs()
    assert ran.last() is None
    ran.record(0, 0)  # the first pass of epoch 0: all zero bits, still a record
    assert ran.last() == (0, 0) and ran.take() == 0 and ran.last() is None and ran.take() is None
    ran.record(plan.WorkerEpochs.PASS, 7)
    assert ran.last() == (plan.WorkerEpochs.PASS, 7)


def test_a_snapshot_at_the_end_of_a_relaid_epoch_starts_the_next(indexed_shards):
    """A state loaded into another batch size lays the rest of its epoch out anew (a base of
    consumed positions); a StatefulDataLoader state taken at that rest's last batch, counted
    from a snapshot at its start, finishes the interrupted pass (nothing left) and goes on
    with the next epoch, and loaded into a loader iterated directly starts the next epoch."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make(batch_size):
        return FastMNISTLoader(indexed_shards, batch_size=batch_size, normalize=False, seed=5)

    first = make(100)
    it = iter(first)
    seen = sum(batch_indices([next(it) for _ in range(3)]), [])
    loader = make(50)
    loader.load_state_dict(first.state_dict())
    dl = StatefulDataLoader(loader, batch_size=None, num_workers=1, snapshot_every_n_steps=1000)
    batches, rest = iter(dl), []
    while len(seen) + len(rest) < INDEXED_N:  # up to the rest's last batch, the iterator not yet exhausted
        rest += batch_indices([next(batches)])[0]
    assert sorted(seen + rest) == list(range(INDEXED_N))
    state = dl.state_dict()  # the snapshot is the worker's first: all the rest is counted on it
    assert state["_steps_since_snapshot"] == -(-(INDEXED_N - 300) // 50)
    again = StatefulDataLoader(make(50), batch_size=None, num_workers=1)
    again.load_state_dict(state)
    assert batch_indices(again) == []  # the interrupted pass: nothing left of it
    following = batch_indices(_epoch_of(make(50), 1))
    assert batch_indices(again) == following
    direct = make(50)  # loaded into the loader itself, iterated without a DataLoader: the next epoch at once
    direct.load_state_dict(state)
    assert batch_indices(direct) == following
    assert next(batches, None) is None  # the pass exhausted: its state starts the next epoch
    exhausted = StatefulDataLoader(make(50), batch_size=None, num_workers=1)
    exhausted.load_state_dict(dl.state_dict())
    assert batch_indices(exhausted) == following
