"""Reused group buffers: a block is handed out again only once nothing made from it is alive,
so batches a user keeps never change, and an epoch that keeps nothing reuses a few blocks."""

import numpy as np
import pytest
import torch

from fastmnist import FastMNISTLoader
from fastmnist.loading.buffers import KEEP, BufferPool
from fastmnist.loading.delivery import GROUP_SAMPLES

from .conftest import decode_indices


def _block(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("keep_alive", [
    lambda t: t,  # the tensor itself
    lambda t: t.split(3)[1],  # a batch sliced from it
    lambda t: t[2:5].numpy(),  # a numpy view of a batch
    lambda t: t.untyped_storage(),  # its storage
    lambda t: [t.view(-1)],  # a view inside a container
])
def test_a_block_is_reused_only_once_nothing_uses_it(keep_alive):
    pool = BufferPool(rows=8, sample_shape=(2,), dtype=torch.float32, keep=2)
    first = pool.take(8)
    block = _block(first)
    held = keep_alive(first)
    del first
    second = pool.take(5)
    assert _block(second) != block and second.shape == (5, 2)
    del held, second
    assert _block(pool.take(8)) == block  # nothing uses it now


def test_blocks_held_on_to_leave_a_full_pool():
    pool = BufferPool(rows=4, sample_shape=(), dtype=torch.uint8, keep=2)
    held = [pool.take(4) for _ in range(5)]  # all in use: each a new block
    assert len({_block(t) for t in held}) == 5
    latest = {_block(t) for t in held[-2:]}  # the pool's two now
    del held[-2:]
    again = [pool.take(4), pool.take(4)]
    assert {_block(t) for t in again} == latest
    assert all(_block(t) not in latest for t in held)


@pytest.mark.parametrize("source", ["float32", "uint8"])
@pytest.mark.parametrize("keeping", [False, True])
def test_loader_batches_kept_across_epochs_never_change(synth_shards, source, keeping):
    """Three epochs, keeping (or not) one batch of every third group, one of them as a numpy
    view: every batch is the float32 source's, each kept batch still equals its copy taken
    when it was yielded, and new blocks were needed only for the groups kept."""
    loader = FastMNISTLoader(synth_shards, batch_size=64, seed=3, images=source)
    reference = FastMNISTLoader(synth_shards, batch_size=64, seed=3, images="float32")
    per_group = GROUP_SAMPLES // 64
    kept, blocks, numpy_view = [], set(), None
    for _ in range(3):
        for number, ((x, y), (x_ref, _)) in enumerate(zip(loader, reference, strict=True)):
            assert torch.equal(x, x_ref)  # the same samples, normalised to the same bits
            blocks.add(_block(x))
            if keeping and number % (3 * per_group) == 5:
                if numpy_view is None:
                    numpy_view = (x.numpy(), x.numpy().copy())
                else:
                    kept.append((x, x.clone(), y, y.clone()))
    assert all(torch.equal(x, c) and torch.equal(y, d) for x, c, y, d in kept)
    assert numpy_view is None or np.array_equal(*numpy_view)
    groups_kept = len(kept) + (numpy_view is not None)
    assert groups_kept == (60 if keeping else 0)
    assert len(blocks) <= groups_kept + KEEP


def test_batches_of_a_reused_block_are_the_order(indexed_shards):
    """Consumed and dropped batch by batch (blocks reused), the batches are the order."""
    loader = FastMNISTLoader(indexed_shards, batch_size=100, seed=9, normalize=False)
    for epoch in range(2):
        seen = [decode_indices(x) for x, _ in loader]
        order = loader.rank_order(epoch).tolist()
        assert seen == [order[i:i + 100] for i in range(0, len(order), 100)]


def test_batches_from_a_worker_reusing_blocks_stay_as_sent(synth_shards):
    """One persistent DataLoader worker (it gathers in groups from its own pool): 3 epochs of
    batches, all kept in the main process, equal the loader's own batches of those epochs."""
    from torch.utils.data import DataLoader

    loader = FastMNISTLoader(synth_shards, batch_size=64, seed=4)
    through_worker = DataLoader(loader, batch_size=None, num_workers=1, persistent_workers=True)
    received = [batch for _ in range(3) for batch in through_worker]
    direct = FastMNISTLoader(synth_shards, batch_size=64, seed=4)
    expected = [batch for _ in range(3) for batch in direct]
    assert len(received) == len(expected) == 3 * len(loader)
    for (x, y), (rx, ry) in zip(received, expected, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_held_batch_slice_numpy_view_and_storage_survive_50_groups(indexed_shards):
    """Held while 50 more groups are gathered into pooled blocks (one group per epoch of
    1,003 samples): a batch, a slice of another, a numpy view of a third and the storage of
    a fourth (each the only reference left) never change. tools/pythons.sh runs this on
    every Python that requires-python admits."""
    loader = FastMNISTLoader(indexed_shards, batch_size=64, seed=5, normalize=False)
    batches = (x for _ in range(52) for x, _ in loader)
    held = {"batch": next(batches), "slice": next(batches)[3:9], "numpy view": next(batches).numpy(),
            "storage": next(batches).untyped_storage()}
    as_tensor = {"batch": lambda h: h, "slice": lambda h: h, "numpy view": torch.from_numpy,
                 "storage": lambda h: torch.tensor([], dtype=torch.uint8).set_(h)}
    copies = {name: as_tensor[name](h).clone() for name, h in held.items()}
    gathered = sum(1 for _ in batches)
    assert gathered >= 50 * len(loader) - 4
    for name, h in held.items():
        assert torch.equal(as_tensor[name](h), copies[name]), name
