"""Streamed shards held in memory: each fetched whole (in its own thread) and checked once,
keeping only the shards in use plus the next ``prefetch`` of the visiting order."""

import bisect
import hashlib

import numpy as np
import torch

from .errors import FastMNISTError
from .manifest import Shard
from .normalize import normalize_u8_numpy
from .tar import decode_shard
from .transport import DEFAULT_RETRY, Retry, fetch


class ShardCache:
    """``shards``: the split's shards and the URL of each. ``verify``: check each shard's
    sha256 as it arrives (a mismatch after a complete download is an error at once).
    ``retry``: how fetches over HTTP ride out transient failures. ``normalize``: ``(mean,
    std)`` to gather float32 normalised images, or None to gather uint8. Gathering runs in
    numpy, single-threaded: torch's intra-op threads stall whenever a fetching thread holds
    a core.
    """

    def __init__(self, shards: list[Shard], urls: list[str], prefetch: int, verify: bool,
                 normalize: tuple[float, float] | None, retry: Retry = DEFAULT_RETRY):
        self.shards, self.urls, self.prefetch, self.verify, self.retry = shards, urls, prefetch, verify, retry
        self.normalize = normalize
        self.firsts = np.array([s.first for s in shards])
        self.loaded = {}  # shard number -> (images, labels): uint8 (n,1,28,28), int64 (n,)
        self.pending = {}  # shard number -> Future of (images, labels)
        self.pool = None
        self.in_use = []  # the shards of the batch index_batches yielded last

    def index_batches(self, order: torch.Tensor, batches, batch_size: int, then: torch.Tensor):
        """Yield ``order[b * batch_size:(b + 1) * batch_size]`` as int64 numpy arrays for each
        ``b`` of ``batches`` (ascending), each once the shards it needs are loaded, with the
        next ``prefetch`` shards being fetched: those ``order`` visits next, then those
        ``then`` (the next epoch's order) starts with."""
        plan, starts = self._plan(order)  # order visits shard plan[i] from position starts[i]
        visits = plan + self._plan(then)[0]
        order, here = order.numpy(), None
        for b in batches:
            start, stop = b * batch_size, min((b + 1) * batch_size, len(order))
            p, q = bisect.bisect_right(starts, start) - 1, bisect.bisect_right(starts, stop - 1) - 1
            if (p, q) != here:
                here = p, q
                self._keep(plan[p:q + 1], visits[q + 1:q + 1 + self.prefetch])
            yield order[start:stop]

    def _plan(self, order: torch.Tensor) -> tuple[list[int], list[int]]:
        """The shards ``order`` visits, in turn, and the position where each visit starts."""
        which = np.searchsorted(self.firsts, order.numpy(), side="right") - 1
        starts = np.flatnonzero(np.diff(which, prepend=-1))
        return which[starts].tolist(), starts.tolist()

    def gather(self, idx: np.ndarray, x_out=None, y_out=None):
        """Images (float32 if ``normalize``, else uint8) and int64 labels of the samples
        ``idx``: the batch ``index_batches`` yielded last."""
        shape, dtype = (len(idx), 1, 28, 28), np.uint8 if self.normalize is None else np.float32
        x = x_out.numpy() if x_out is not None else np.empty(shape, dtype)
        y = y_out.numpy() if y_out is not None else np.empty(len(idx), np.int64)
        shards = dict.fromkeys(self.in_use)
        which = np.searchsorted(self.firsts, idx, side="right") - 1 if len(shards) > 1 else None
        for s in shards:
            images, labels = self.loaded[s]
            rows = slice(None) if which is None else np.flatnonzero(which == s)
            local = idx[rows] - self.firsts[s]
            if self.normalize is None:
                x[rows] = images.take(local, 0)
            elif which is None:
                normalize_u8_numpy(images.take(local, 0), *self.normalize, out=x)
            else:
                x[rows] = normalize_u8_numpy(images.take(local, 0), *self.normalize,
                                             out=np.empty((len(local), 1, 28, 28), np.float32))
            y[rows] = labels.take(local)
        return torch.from_numpy(x), torch.from_numpy(y)

    def _keep(self, in_use: list[int], ahead: list[int]) -> None:
        """Drop every shard not in ``in_use`` or ``ahead``, start fetching those of ``ahead``
        not yet held, then make sure those of ``in_use`` are loaded (waiting for them)."""
        self.in_use = in_use
        for held in self.loaded, self.pending:
            for s in [s for s in held if s not in in_use and s not in ahead]:
                del held[s]
        for s in ahead:
            if s not in self.loaded and s not in self.pending:
                if self.pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self.pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="fastmnist-fetch")
                self.pending[s] = self.pool.submit(self._load, s)
        for s in in_use:
            if s not in self.loaded:
                future = self.pending.pop(s, None)
                self.loaded[s] = future.result() if future is not None else self._load(s)

    def _load(self, s: int):
        shard, url = self.shards[s], self.urls[s]
        data = fetch(url, shard.size, retry=self.retry)
        if self.verify and hashlib.sha256(data).hexdigest() != shard.sha256:
            raise FastMNISTError(f"{url}: sha256 differs from the manifest (corrupted)")
        return decode_shard(data, shard.first, shard.count, url)
