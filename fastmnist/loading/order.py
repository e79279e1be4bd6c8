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


LOCALITY_WINDOW = 8  # blocks whose samples block_order shuffles together


def block_order(n: int, seed: int, epoch: int, shuffle: bool, block: int) -> torch.Tensor:
    """int64 ``(n,)``: the quasi-random order for sets larger than the page cache. The
    blocks of ``block`` consecutive samples are shuffled, then the samples of each window of
    ``LOCALITY_WINDOW`` successive blocks (in that order) are shuffled among themselves, so
    a reader works through ``LOCALITY_WINDOW * block`` samples at a time. ``0..n-1``
    unshuffled."""
    if not shuffle:
        return torch.arange(n)
    blocks = epoch_order(-(-n // block), seed, epoch, True, 2).numpy()
    parts = []
    for w in range(0, len(blocks), LOCALITY_WINDOW):
        members = np.concatenate([np.arange(b * block, min((b + 1) * block, n))
                                  for b in blocks[w:w + LOCALITY_WINDOW]])
        parts.append(members[epoch_order(len(members), seed, epoch, True, 3, w).numpy()])
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.arange(0)


def shard_order(counts: list[int], seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """int64 ``(sum(counts),)``: the shards in a shuffled order, each shard's samples shuffled
    within it, so a reader needs only one shard at a time (the order for streamed shards)."""
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return torch.cat([firsts[s] + epoch_order(counts[s], seed, epoch, shuffle, 1, s)
                      for s in epoch_order(len(counts), seed, epoch, shuffle, 0).tolist()])


def rank_share(order: torch.Tensor, rank: int, world_size: int, drop_last: bool,
               blocks: bool = False, even: bool = True) -> torch.Tensor:
    """The samples of ``rank``. With ``even`` (the default), as ``DistributedSampler``
    assigns them: every rank gets the same count; ``drop_last`` drops the tail that does not
    divide evenly, otherwise the order is padded by repeating its start. With ``even=False``
    nothing is padded or dropped: the ranks' counts differ by at most one. Rank ``r`` takes
    positions ``r, r + W, r + 2W, ...``, or with ``blocks`` the run ``runs(...)[r]`` of
    consecutive positions (so that, reading streamed shards, each rank needs only the
    shards its run covers)."""
    n = len(order)
    if world_size == 1 or n == 0:
        return order
    if even and drop_last:
        order = order[: n // world_size * world_size]
    elif even:
        pad = math.ceil(n / world_size) * world_size - n
        order = torch.cat([order, order.repeat(math.ceil(pad / n))[:pad]])
    if blocks:
        start, size = runs(n, world_size, drop_last, even)[rank]
        return order[start:start + size]
    return order[rank::world_size].contiguous()


def runs(n: int, world_size: int, drop_last: bool, even: bool = True) -> list[tuple[int, int]]:
    """``(start, size)`` of each rank's run of an order of ``n`` positions (padded or cut as
    ``rank_share`` does) when ranks take consecutive runs."""
    if even:
        size = samples_per_rank(n, world_size, drop_last)
        return [(r * size, size) for r in range(world_size)]
    q, m = divmod(n, world_size)
    return [(r * q + min(r, m), q + (r < m)) for r in range(world_size)]


def samples_per_rank(n: int, world_size: int, drop_last: bool, even: bool = True, rank: int = 0) -> int:
    """Samples ``rank`` gets of an order of ``n`` (see ``rank_share``)."""
    if not even:
        return n // world_size + (rank < n % world_size)
    return n // world_size if drop_last else math.ceil(n / world_size)


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def worker_parts(batches: int, workers: int) -> list[tuple[int, int]]:
    """``(first, count)`` of each of ``workers`` consecutive parts of ``batches`` batches,
    the longer parts first (counts differ by at most one)."""
    q, m = divmod(batches, workers)
    return [(p * q + min(p, m), q + (p < m)) for p in range(workers)]


def delivered(done: int, batches: int, workers: int) -> list[int]:
    """How many batches of each part of ``worker_parts(batches, workers)`` a DataLoader has
    yielded after ``done`` batches, collecting one from each part in turn (skipping the
    parts already finished, as it skips workers that have stopped)."""
    q, m = divmod(batches, workers)
    if done <= q * workers:
        rounds, extra = divmod(done, workers)
        return [rounds + (p < extra) for p in range(workers)]
    return [q + (p < done - q * workers) for p in range(workers)]
