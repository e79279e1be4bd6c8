"""Sample order: a per-epoch permutation, split across DDP ranks, then into batches.

Everything here is a pure function of its arguments, so every process that asks gets the
same answer without communicating.
"""

import math

import numpy as np
import torch


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """int64 ``(n,)``: a permutation drawn from ``(seed, epoch)``, or ``0..n-1`` unshuffled."""
    if not shuffle:
        return torch.arange(n)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return torch.from_numpy(rng.permutation(n))


def rank_share(order: torch.Tensor, rank: int, world_size: int, drop_last: bool) -> torch.Tensor:
    """The samples of ``rank``, as ``DistributedSampler`` assigns them: every rank gets the
    same count; ``drop_last`` drops the tail that does not divide evenly, otherwise the order
    is padded by repeating its start. Rank ``r`` takes positions ``r, r + W, r + 2W, ...``."""
    if world_size == 1:
        return order
    n = len(order)
    if drop_last:
        order = order[: n // world_size * world_size]
    else:
        pad = math.ceil(n / world_size) * world_size - n
        order = torch.cat([order, order.repeat(math.ceil(pad / n))[:pad]])
    return order[rank::world_size].contiguous()


def samples_per_rank(n: int, world_size: int, drop_last: bool) -> int:
    return n // world_size if drop_last else math.ceil(n / world_size)


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)
