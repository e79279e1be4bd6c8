"""Sample order: a per-epoch permutation, split across DDP ranks, then into batches.

Everything here is a pure function of its arguments, so every process that asks gets the
same answer without communicating.
"""

import math

import numpy as np
import torch


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, *stream: int) -> torch.Tensor:
    """int64 ``(n,)``: a permutation drawn from ``(seed, epoch, *stream)``, or ``0..n-1``
    unshuffled."""
    if not shuffle:
        return torch.arange(n)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, *stream])))
    return torch.from_numpy(rng.permutation(n))


def shard_order(counts: list[int], seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """int64 ``(sum(counts),)``: the shards in a shuffled order, each shard's samples shuffled
    within it, so a reader needs only one shard at a time (the order for streamed shards)."""
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return torch.cat([firsts[s] + epoch_order(counts[s], seed, epoch, shuffle, 1, s)
                      for s in epoch_order(len(counts), seed, epoch, shuffle, 0).tolist()])


def rank_share(order: torch.Tensor, rank: int, world_size: int, drop_last: bool,
               blocks: bool = False) -> torch.Tensor:
    """The samples of ``rank``, as ``DistributedSampler`` assigns them: every rank gets the
    same count; ``drop_last`` drops the tail that does not divide evenly, otherwise the order
    is padded by repeating its start. Rank ``r`` takes positions ``r, r + W, r + 2W, ...``,
    or with ``blocks`` the ``r``-th of ``W`` equal runs of positions (so that, reading
    streamed shards, each rank needs only the shards its run covers)."""
    if world_size == 1:
        return order
    n = len(order)
    if drop_last:
        order = order[: n // world_size * world_size]
    else:
        pad = math.ceil(n / world_size) * world_size - n
        order = torch.cat([order, order.repeat(math.ceil(pad / n))[:pad]])
    if blocks:
        per_rank = len(order) // world_size
        return order[rank * per_rank:(rank + 1) * per_rank]
    return order[rank::world_size].contiguous()


def samples_per_rank(n: int, world_size: int, drop_last: bool) -> int:
    return n // world_size if drop_last else math.ceil(n / world_size)


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)
