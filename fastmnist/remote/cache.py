"""Streamed shards held in memory: each fetched whole (in its own thread) and checked once,
keeping only the shards in use plus the next ``prefetch`` of the visiting order.

When a rank's DataLoader workers divide its run into parts, a shard that two parts touch
is fetched once, by the worker whose part starts with it, and handed to the others as a
file (a :class:`Handoff`), so each shard crosses the network once per rank and epoch.
"""

import bisect
import hashlib
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FastMNISTError
from ..formats.manifest import IMAGE_SHAPE, Shard
from ..formats.normalize import normalize_u8_numpy
from ..formats.tar import decode_shard
from .transport import DEFAULT_RETRY, Retry, fetch, log


class ShardCache:
    """``shards``: the split's shards and the URL of each. ``verify``: check each shard's
    sha256 as it arrives (a mismatch after a complete download is an error at once).
    ``retry``: how remote fetches ride out transient failures; ``storage_options``: for
    fsspec URLs. ``mean_std``: ``(mean, std)`` to gather float32 normalised images, or
    None to gather uint8. A label of ``num_classes`` or more is a corrupted shard. Gathering
    runs in numpy, single-threaded: torch's intra-op threads stall whenever a fetching
    thread holds a core.
    """

    def __init__(self, shards: list[Shard], urls: list[str], prefetch: int, verify: bool,
                 mean_std: tuple[float, float] | None, retry: Retry = DEFAULT_RETRY,
                 storage_options: dict | None = None, num_classes: int = 10):
        self.shards, self.urls, self.prefetch, self.verify, self.retry = shards, urls, prefetch, verify, retry
        self.storage_options, self.num_classes = storage_options, num_classes
        self.mean_std = mean_std
        self.firsts = np.array([s.first for s in shards])
        self.loaded = {}  # shard number -> (images, labels): uint8 (n,1,28,28), int64 (n,)
        self.pending = {}  # shard number -> Future of (images, labels)
        self.in_use = []  # the shards of the batch index_batches yielded last
        self.stopped = threading.Event()  # set when the loader is gone: fetches still retrying give up
        self.slots = threading.Semaphore(prefetch)  # fetches running at once

    def index_batches(self, order: torch.Tensor, batches: range, batch_size: int, then: torch.Tensor | None,
                      handoff: "Handoff | None" = None):
        """Yield ``order[b * batch_size:(b + 1) * batch_size]`` as int64 numpy arrays for each
        ``b`` of ``batches`` (ascending), each once the shards it needs are loaded, with the
        next ``prefetch`` shards being fetched: those these batches visit next, then those
        ``then`` (the next epoch's order, if given) starts with. ``handoff``: the shards this
        worker shares with the others of its rank (it then starts with nothing held)."""
        if handoff is not None:
            self.loaded, self.pending = {}, {}
        if not batches:
            return
        lo = batches[0] * batch_size  # these batches visit shard plan[i] from position starts[i]
        plan, starts = self._plan(order[lo:(batches[-1] + 1) * batch_size])
        starts = [lo + start for start in starts]
        visits = plan + (self._plan(then)[0] if then is not None else [])
        order, here = order.numpy(), None
        for b in batches:
            start, stop = b * batch_size, min((b + 1) * batch_size, len(order))
            p, q = bisect.bisect_right(starts, start) - 1, bisect.bisect_right(starts, stop - 1) - 1
            if (p, q) != here:
                here = p, q
                self._keep(plan[p:q + 1], visits[q + 1:q + 1 + self.prefetch], handoff)
            yield order[start:stop]

    def handoff(self, order: torch.Tensor, parts: list[tuple[int, int]], me: int, where: Path) -> "Handoff":
        """Who fetches what when workers divide ``order`` (a rank's) into ``parts``
        (``(start, stop)`` positions), this worker taking part ``me``: a shard that several
        parts touch is fetched by the second of them (whose part starts with it) and handed
        to the others through files in ``where``."""
        touched = {}  # shard -> the parts that touch it, in order
        for part, (start, stop) in enumerate(parts):
            for s in dict.fromkeys(self._plan(order[start:stop])[0]):
                touched.setdefault(s, []).append(part)
        gives, takes = {}, set()
        for s, by in touched.items():
            if len(by) < 2:
                continue  # one part's own
            giver, first = by[1], parts[by[1]][0]
            if self._plan(order[first:first + 1])[0] != [s]:
                continue  # not where the giver starts (padding repeats a shard): each fetches its own
            if me == giver:
                gives[s] = [part for part in by if part != giver]
            elif me in by:
                takes.add(s)
        return Handoff(where, me, gives, takes, self.retry.total_s)

    def _plan(self, order: torch.Tensor) -> tuple[list[int], list[int]]:
        """The shards ``order`` visits, in turn, and the position where each visit starts."""
        which = np.searchsorted(self.firsts, order.numpy(), side="right") - 1
        starts = np.flatnonzero(np.diff(which, prepend=-1))
        return which[starts].tolist(), starts.tolist()

    def gather(self, idx: np.ndarray, x_out=None, y_out=None):
        """Images (float32 if ``mean_std``, else uint8) and int64 labels of the samples
        ``idx``: the batch ``index_batches`` yielded last."""
        shape, dtype = (len(idx), *IMAGE_SHAPE), np.uint8 if self.mean_std is None else np.float32
        x = x_out.numpy() if x_out is not None else np.empty(shape, dtype)
        y = y_out.numpy() if y_out is not None else np.empty(len(idx), np.int64)
        shards = dict.fromkeys(self.in_use)
        which = np.searchsorted(self.firsts, idx, side="right") - 1 if len(shards) > 1 else None
        for s in shards:
            images, labels = self.loaded[s]
            rows = slice(None) if which is None else np.flatnonzero(which == s)
            local = idx[rows] - self.firsts[s]
            if self.mean_std is None:
                x[rows] = images.take(local, 0)
            elif which is None:
                normalize_u8_numpy(images.take(local, 0), *self.mean_std, out=x)
            else:
                x[rows] = normalize_u8_numpy(images.take(local, 0), *self.mean_std,
                                             out=np.empty((len(local), *IMAGE_SHAPE), np.float32))
            y[rows] = labels.take(local)
        return torch.from_numpy(x), torch.from_numpy(y)

    def _keep(self, in_use: list[int], ahead: list[int], handoff: "Handoff | None") -> None:
        """Drop every shard not in ``in_use`` or ``ahead``, start fetching those of ``ahead``
        not yet held, then make sure those of ``in_use`` are loaded (waiting for them)."""
        self.in_use = in_use
        for held in self.loaded, self.pending:
            for s in [s for s in held if s not in in_use and s not in ahead]:
                del held[s]
        for s in ahead:
            if s not in self.loaded and s not in self.pending:
                self.pending[s] = _in_background(self.slots, self._load, s, handoff)
        for s in in_use:
            if s not in self.loaded:
                future = self.pending.pop(s, None)
                self.loaded[s] = future.result() if future is not None else self._load(s, handoff)

    def _load(self, s: int, handoff: "Handoff | None"):
        shard, url = self.shards[s], self.urls[s]
        if handoff is not None and s in handoff.takes and (got := handoff.take(s, shard.count)) is not None:
            return got
        data = fetch(url, shard.size, retry=self.retry, storage_options=self.storage_options,
                     stop=self.stopped)
        if self.verify and hashlib.sha256(data).hexdigest() != shard.sha256:
            raise FastMNISTError(f"{url}: sha256 differs from the manifest (corrupted)")
        images, labels = decode_shard(data, shard.first, shard.count, url, self.num_classes,
                                      shard.labels_sha256)
        if handoff is not None and s in handoff.gives:
            handoff.give(s, images, labels)
        return images, labels


def _in_background(slots: threading.Semaphore, fn, *args) -> Future:
    """``fn(*args)`` on a new daemon thread once it holds one of ``slots`` (as a thread pool
    of that many workers would run it; but a fetch still retrying when the program ends, its
    server gone, does not hold up the exit as a pool's workers would)."""
    future = Future()

    def run():
        try:
            with slots:
                future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name="fastmnist-fetch", daemon=True).start()
    return future


@dataclass(frozen=True)
class Handoff:
    """Decoded shards passed between a rank's DataLoader workers as files in ``where`` (a
    directory private to the loader and rank): this worker (of part ``me``) ``gives`` each
    shard it maps to the parts that take it, and ``takes`` the others from whoever fetched
    them, waiting at most ``wait_s`` before fetching one itself. A shard's file holds its
    uint8 images and int64 labels (two ``.npy`` records), whatever the epoch."""

    where: Path
    me: int
    gives: dict[int, list[int]]
    takes: set[int]
    wait_s: float

    def give(self, s: int, images: np.ndarray, labels: np.ndarray) -> None:
        self.where.mkdir(mode=0o700, exist_ok=True)
        tmp = self.where / f".s{s}-{os.getpid()}-{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, images)
            np.save(f, labels)
        for part in self.gives[s]:  # one name per taker, each appearing whole
            link = tmp.with_suffix(f".p{part}")
            os.link(tmp, link)
            os.replace(link, self.where / f"s{s}-p{part}.npy")
        tmp.unlink()

    def take(self, s: int, count: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Shard ``s``'s images and labels, as another worker left them, or None (with a
        warning) if they do not come in time or are not what they should be."""
        path, pause = self.where / f"s{s}-p{self.me}.npy", 0.002
        deadline = time.monotonic() + self.wait_s
        while not path.exists():
            if time.monotonic() > deadline:
                log.warning("%s: shard %d not handed over within %g s; fetching it here", self.where, s,
                            self.wait_s)
                return None
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        try:
            with open(path, "rb") as f:
                images, labels = np.load(f, allow_pickle=False), np.load(f, allow_pickle=False)
            path.unlink()
        except (OSError, ValueError) as e:
            log.warning("%s: cannot read the handed-over shard %d (%s); fetching it here", path, s, e)
            return None
        if images.shape != (count, *IMAGE_SHAPE) or images.dtype != np.uint8 or labels.shape != (count,) \
                or labels.dtype != np.int64:
            log.warning("%s: the handed-over shard %d has the wrong shape; fetching it here", path, s)
            return None
        return images, labels
