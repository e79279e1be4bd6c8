"""``FastMNISTLoader``: a drop-in for the tutorial ``DataLoader`` over a converted shard set.

The loader owns the arguments, epochs and resume, the split across ranks and DataLoader
workers, and delivery (CPU, pinned, or copied ahead to CUDA); where batches come from is
a source's business (``sources.py``).
"""

import dataclasses
import os
import shutil
import tempfile
import uuid
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import progress
from .buffers import BufferPool
from .compat import EpochSampler, SplitDataset
from .device import prefetch_to_cuda
from .errors import FastMNISTError
from .manifest import IMAGE_SHAPE
from .normalize import normalizer
from .order import batch_count, block_order, delivered, rank_share, runs, samples_per_rank, worker_parts
from .sources import ArraySource, StreamSource, empty_batch, local_arrays
from .store import Split, open_remote, open_shards
from .transport import DEFAULT_RETRY, Retry, is_url

GROUP_SAMPLES = 1024  # on the CPU, samples gathered per call (each batch is then a slice)
WORKER_WARNING = (
    "FastMNISTLoader runs in a DataLoader worker, where it has nothing to gain: a batch of "
    "mapped arrays takes microseconds to gather, and each one now crosses a process boundary "
    "(about 1 ms; see the README's worker figures). Iterate the loader directly; use "
    "device='cuda' for pinned, overlapped copies to the GPU.")


class FastMNISTLoader(IterableDataset):
    """Batches ``(x, y)`` of a split: x float32 ``[B, 1, 28, 28]`` normalised exactly like
    ``ToTensor()`` + ``Normalize((mean,), (std,))`` (uint8 if ``normalize=False``), y int64
    ``[B]`` (``[B, 8]`` for ``qmnist-extended``, as QMNIST with ``compat=False``). Iterate
    it directly, or wrap it in ``DataLoader(loader, batch_size=None, num_workers=k)``;
    either way the batches and their order are the same.

    Order: a fresh permutation per epoch from ``(seed, epoch)``; each ``iter()`` starts the
    next epoch unless ``set_epoch`` chose one. Ranks split each epoch as
    ``DistributedSampler`` does (padding by repetition, or dropping the tail with
    ``drop_last``), so every rank gets ``len(loader)`` batches.

    ``path``: a converted set's directory, or WebDataset shards by URL (``http(s)://``,
    ``file://``, ``pipe:``, or any fsspec URL: ``s3://``, ``gs://``, ``memory://``, ...):
    the set's URL ending in "/", or shard URLs (a list or a brace pattern) with the set's
    ``manifest.json`` beside them. ``storage_options``: passed to fsspec (endpoint_url,
    key, secret, anon, ...).
    ``format``: "npy" or "wds" (tar shards); default npy where the set has it. Local tar
    shards are validated and decoded once, on first use, then read like the arrays, in the
    same order. Shards from URLs stream a shard at a time (``prefetch`` fetched ahead, the
    next epoch's first ones included) in a different order: shards shuffled, then samples
    shuffled within each shard; ranks take consecutive runs of it, so each rank fetches
    only the shards its run covers.
    ``source``: which data to read, "float32" (pre-normalised; the default on the CPU) or
    "uint8" (normalised on ``device``; the default on CUDA, 4x fewer bytes to copy, and for
    sets converted with ``--no-float32``).
    ``resident``: copy the whole split onto ``device`` once and gather there.
    ``pin_memory``: put host batches in pinned memory (default: when CUDA is available).
    ``retry``: how remote fetches ride out transient failures (``transport.Retry``).
    ``even``: False gives ranks disjoint shares with no padding or dropping (exact
    evaluation; batch counts may then differ by one between ranks).
    ``locality``: for a local set larger than the page cache, visit it in
    ``order.block_order`` (blocks of ``locality`` consecutive samples shuffled, then samples
    shuffled within windows of 8 blocks) instead of a full permutation; None: the latter.

    Like a ``DataLoader`` it has ``dataset`` (``len()`` is the split's sample count;
    indexing gives one normalised sample), ``sampler`` (``set_epoch``; ``len()`` is this
    rank's samples per epoch), ``batch_size``, ``drop_last``, ``num_workers`` and
    ``pin_memory``.
    """

    num_workers = 0  # batches are made in the calling process (wrap it in a DataLoader for workers)

    def __init__(self, path, split: str = "train", batch_size: int = 64, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, *, rank: int | None = None,
                 world_size: int | None = None, device="cpu", source: str | None = None,
                 normalize: bool = True, resident: bool = False, pin_memory: bool | None = None,
                 prefetch: int = 2, verify: bool = False, format: str | None = None, even: bool = True,
                 retry: Retry | None = None, storage_options: dict | None = None,
                 locality: int | None = None):
        if locality is not None and (type(locality) is not int or locality < 1):
            raise FastMNISTError(f"locality must be a positive number of samples or None, got {locality!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise FastMNISTError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FastMNISTError(f"device={device!r} asked for, but CUDA is not available here")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        elif pin_memory and not torch.cuda.is_available():
            raise FastMNISTError("pin_memory=True needs CUDA, which is not available here")
        chosen = source is not None
        if source is None:
            source = "uint8" if self.device.type == "cuda" or not normalize else "float32"
        if source not in ("float32", "uint8") or (source == "float32" and not normalize):
            raise FastMNISTError(f"source must be 'float32' or 'uint8' (uint8 when "
                                 f"normalize=False), got {source!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise FastMNISTError(f"prefetch must be a positive integer, got {prefetch!r}")
        rank, world_size = _distributed(rank, world_size)
        if is_url(path):
            if locality is not None:
                raise FastMNISTError("locality is for local sets: streamed shards are already read "
                                     "a shard at a time")
            if resident or format not in (None, "wds"):
                raise FastMNISTError("shard URLs stream tar shards: format='wds' only, and "
                                     "resident=True needs a local set")
            self.info, self._urls = open_remote(path, split, retry or DEFAULT_RETRY, storage_options)
            self._root, self.format = None, "wds"
            # where this rank's DataLoader workers hand shards to each other; gone with the loader
            self._handoff = Path(tempfile.gettempdir()) / f"fastmnist-{uuid.uuid4().hex}-rank{rank}"
            weakref.finalize(self, _remove_dir, self._handoff, os.getpid())
        else:
            local = open_shards(path, verify=verify).split(split)
            self.info, self._urls, self._root, self._handoff = local.info, None, local.root, None
            self.format = format or local.formats[0]
            if self.format not in local.formats:
                raise FastMNISTError(f"{path}: split {split!r} has no {self.format!r} data "
                                     f"(it has {', '.join(local.formats)})")
            if not chosen and self.format == "npy" and "images_f32" not in self.info.arrays:
                source = "uint8"  # a set converted with --no-float32: normalised per batch
            array = "images_f32" if source == "float32" else "images_u8"
            if self.format == "npy" and array not in self.info.arrays:
                raise FastMNISTError(f"{path}: split {split!r} has no {array} array for "
                                     f"source={source!r}")
        self.verify, self.retry, self.storage_options = verify, retry or DEFAULT_RETRY, storage_options
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.source, self.normalize, self.resident = source, normalize, resident
        self.pin_memory, self.prefetch, self.even, self.locality = pin_memory, prefetch, even, locality
        described = dataclasses.asdict(self.info)
        if not described["label_shape"]:  # as before label_shape existed: older states still match
            del described["label_shape"]
        self._identity = {"set": progress.fingerprint(described),
                          "order": "shards" if self._urls is not None else
                          f"blocks of {locality}" if locality else "samples",
                          "seed": seed, "shuffle": shuffle}
        self._next_epoch = 0
        self._resume = None  # _Step the next iter() continues, from load_state_dict
        self._step = None  # _Step of the iteration in progress (or last run)
        self._batch_source = None  # made on first use in each process
        self._group_buffers = None  # BufferPools of _pools, made on first use in each process

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return batch_count(self.samples_per_rank, self.batch_size, self.drop_last)

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank visits per epoch (padding included, dropped tail excluded)."""
        return samples_per_rank(self.info.count, self.world_size, self.drop_last, self.even, self.rank)

    @property
    def dataset(self) -> SplitDataset:
        """The split as a map-style dataset, as ``DataLoader.dataset``: ``len()`` samples."""
        return SplitDataset(self)

    @property
    def sampler(self) -> EpochSampler:
        """As ``DataLoader.sampler`` with a ``DistributedSampler``: ``set_epoch``, ``len()``."""
        return EpochSampler(self)

    @property
    def batch_source(self) -> ArraySource | StreamSource:
        """Where batches come from, made once per process (never pickled to workers)."""
        if self._batch_source is None:
            if self._urls is not None:  # tar shards hold uint8; on the CPU, normalised while gathered
                on_cpu = self.normalize and self.device.type == "cpu"
                self._batch_source = StreamSource(self.info, self._urls, self.prefetch, self.verify,
                                                  (self.info.mean, self.info.std) if on_cpu else None,
                                                  self.retry, self.storage_options)
                weakref.finalize(self, self._batch_source.cache.stopped.set)
            else:
                self._batch_source = local_arrays(Split(self._root, self.info), self.format, self.source,
                                                  self.device if self.resident else None)
        return self._batch_source

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run ``epoch`` (as ``DistributedSampler.set_epoch``); a
        loaded state of another epoch is dropped."""
        self._next_epoch = epoch
        if self._resume is not None and self._resume.epoch != epoch:
            self._resume = None

    def state_dict(self) -> dict:
        """Where the epoch stands, the same on every rank of a job in step: the epoch, the
        positions of its order consumed (``[start, stop)`` intervals: a few numbers, however
        large the set), what identifies the set, seed and shuffle, and the step layout that
        lets the same configuration continue batch for batch. JSON-serialisable; O(1)."""
        step = self._step if self._step is not None and not self._step.finished else None
        step = step or self._resume or _Step(self._next_epoch)
        layout = self._layout(step)
        return {"version": progress.STATE_VERSION, **self._identity, "epoch": step.epoch,
                "consumed": self._consumed(layout), "step": list(layout.values())}

    def _consumed(self, step: dict) -> progress.Intervals:
        """The positions consumed once every rank has yielded ``step["batches_done"]``
        batches of the iteration ``step`` (keyed by ``progress.STEP_FIELDS``) lays out."""
        base, done, size = step["base"], step["batches_done"], step["batch_size"]
        n = self.info.count
        rest = n - progress.count(base)
        if self._identity["order"] == "samples":  # strided ranks: one prefix of the rest
            return progress.covered(base, n, [(0, done * size * step["world_size"])])
        spans = []
        for start, share in runs(rest, step["world_size"], step["drop_last"], step["even"]):
            total = batch_count(share, size, step["drop_last"])
            parts = worker_parts(total, step["workers"])  # one part, unless workers divide the run
            for (first, _), got in zip(parts, delivered(min(done, total), total, len(parts)), strict=True):
                spans.append((start + first * size, start + min((first + got) * size, share)))
        return progress.covered(base, n, spans)

    def load_state_dict(self, state: dict) -> None:
        """Make the next ``iter()`` continue the epoch ``state`` describes: from this loader's
        ``state_dict()`` on any rank (of this or another world size, batch size or worker
        count), or from a torchdata ``StatefulDataLoader``'s ``state_dict()`` over a loader
        of the same set. Every sample not yet consumed comes exactly once across the ranks
        (padded or cut as ``even``/``drop_last`` say); with the same world size, batch size
        and split rules, the batches are those the interrupted run would have yielded."""
        candidates, since_snapshot = _loader_states(state)
        # the freshest of a StatefulDataLoader's worker states is the one its last batch came with
        state = max((progress.check_state(s, self._identity, self.info.count) for s in candidates),
                    key=lambda s: (s["epoch"], progress.count(s["consumed"])))
        if since_snapshot:  # batches the DataLoader yielded after its last snapshot
            state = self._advanced(state, since_snapshot)
        step = state["step"]
        same = step is not None and all(step[k] == v for k, v in (
            ("batch_size", self.batch_size), ("world_size", self.world_size),
            ("drop_last", self.drop_last), ("even", self.even)))
        if same and step["batches_done"] >= self._batches(step, self.rank):
            self._resume = _Step(state["epoch"] + 1)
        elif same and (get_worker_info() is not None or step["workers"] == 1):
            # In a DataLoader worker (torchdata restoring each worker's own snapshot) the
            # batches keep their workers; loaded here, worker 0 takes the next batch.
            anchor = step["anchor"] if get_worker_info() is not None else step["batches_done"]
            self._resume = _Step(state["epoch"], step["base"], step["batches_done"], anchor, step["workers"])
        elif progress.count(state["consumed"]) == self.info.count:
            self._resume = _Step(state["epoch"] + 1)
        else:
            self._resume = _Step(state["epoch"], state["consumed"])
        self._next_epoch, self._step = self._resume.epoch, None

    def _advanced(self, state: dict, batches: int) -> dict:
        """``state`` (checked) moved on by ``batches`` more batches of its own step layout."""
        step = state["step"]
        if step is None:
            raise FastMNISTError("state_dict: batches after a snapshot, but no step to count them in")
        step = {**step, "batches_done": step["batches_done"] + batches}
        return {**state, "consumed": self._consumed(step), "step": step}

    def _batches(self, step: dict, rank: int) -> int:
        """Batches ``rank`` has in the iteration ``step`` (a checked state's) describes."""
        rest = self.info.count - progress.count(step["base"])
        share = samples_per_rank(rest, step["world_size"], step["drop_last"], step["even"], rank)
        return batch_count(share, step["batch_size"], step["drop_last"])

    def rank_order(self, epoch: int, base: progress.Intervals = ()) -> torch.Tensor:
        """int64 sample indices this rank visits in ``epoch``, in order; of the positions
        outside ``base`` (consumed ones) only."""
        src = self.batch_source
        if self.locality:
            order = block_order(src.count, self.seed, epoch, self.shuffle, self.locality)
        else:
            order = src.order(self.seed, epoch, self.shuffle)
        if base:
            keep = progress.gaps(list(base), len(order))
            order = torch.cat([order[a:b] for a, b in keep])
        return rank_share(order, self.rank, self.world_size, self.drop_last, blocks=src.blocks,
                          even=self.even)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self._resume or _Step(self._next_epoch)
        src = self.batch_source
        worker = get_worker_info()
        k, w = (1, 0) if worker is None else (worker.num_workers, worker.id)
        if w == 0 and worker is not None and isinstance(src, ArraySource):
            warnings.warn(WORKER_WARNING, stacklevel=2)
        divided = src.blocks and k > 1  # streamed shards: the rank's workers divide its run
        if step.workers != (k if divided else 1):  # a fresh layout for what is left of the epoch
            step = _Step(step.epoch, self._consumed(self._layout(step)), workers=k if divided else 1)
        self._resume, self._next_epoch, self._step = None, step.epoch + 1, step
        share = self.rank_order(step.epoch, step.base)
        step.total = batch_count(len(share), self.batch_size, self.drop_last)
        division = None
        if divided:
            # Worker w takes part p = anchor + w (mod k) of the rank's batches, k consecutive
            # parts; the DataLoader collects one batch of each part in turn.
            p = (step.anchor + w) % k
            parts = worker_parts(step.total, k)
            first, count = parts[p]
            numbers = range(first + delivered(step.done, step.total, k)[p], first + count)
            # Shards are handed between workers only in an iteration they all start afresh
            # (after torchdata restores each worker's own snapshot, some are further on).
            size, handoff = self.batch_size, self._handoff if step.done == 0 else None
            division = ([(a * size, (a + c) * size) for a, c in parts], p, handoff)
        else:
            # Worker w takes the batches numbered anchor + w (mod k), as the DataLoader
            # collects them round-robin: the same batches in the same order as without workers.
            numbers = range(step.done + (step.anchor + w - step.done) % k, step.total, k)
        index_batches = src.index_batches(share, numbers, self.batch_size,
                                          lambda: self.rank_order(step.epoch + 1), division)
        normalise = None
        if self.normalize and src.dtype == torch.uint8:
            normalise = normalizer(self.info.mean, self.info.std, self.device)
        if self.device.type == "cuda" and not self.resident:
            batches = prefetch_to_cuda(index_batches, src.gather, src.dtype, self.batch_size,
                                       self.device, self.prefetch, normalise or (lambda x: x),
                                       src.label_shape)
        else:
            pin = self.pin_memory and self.device.type == "cpu"

            def finish(x):  # normalising makes a new tensor: pin that one
                if normalise is None:
                    return x
                return normalise(x).pin_memory() if pin else normalise(x)

            if isinstance(src, ArraySource) and k == 1 and not pin and self.device.type == "cpu":
                batches = _grouped(src, share, numbers, self.batch_size, normalise, self._pools(src.dtype))
            else:
                batches = ((finish(x), y) for x, y in (
                    src.gather(idx, *empty_batch(src.dtype, len(idx), True, src.label_shape) if pin else ())
                    for idx in index_batches))
        for number, batch in zip(numbers, batches, strict=True):
            # batches the DataLoader has yielded once it yields this one
            step.done = (number - first) * k + p + 1 if divided else number + 1
            yield batch
        if not divided:
            step.done = step.total

    def _pools(self, dtype: torch.dtype) -> dict[torch.dtype, BufferPool]:
        """Group buffers of this process for ``_grouped``, by dtype (``dtype`` gathered, and
        float32 normalised), kept across epochs."""
        if self._group_buffers is None:
            rows = self.batch_size * max(1, GROUP_SAMPLES // self.batch_size)
            self._group_buffers = {d: BufferPool(rows, IMAGE_SHAPE, d) for d in {dtype, torch.float32}}
        return self._group_buffers

    def _layout(self, step: "_Step") -> dict:
        """``step`` with this loader's batch size and split rules, keyed by ``progress.STEP_FIELDS``."""
        return dict(zip(progress.STEP_FIELDS, [step.base, step.done, step.anchor, self.batch_size,
                                               self.world_size, self.drop_last, self.even, step.workers],
                        strict=True))

    def __getstate__(self):
        # Workers map the files themselves and share the page cache; never pickle arrays.
        return {**self.__dict__, "_batch_source": None, "_group_buffers": None}


@dataclasses.dataclass
class _Step:
    """An iteration over ``epoch``: of the positions outside ``base``, split among the ranks
    as the loader splits them, each rank has yielded ``done`` batches. With ``workers`` 1,
    those are batches ``0 .. done - 1``, and DataLoader worker ``w`` of ``k`` takes the
    batches numbered ``anchor + w`` modulo ``k``. With ``workers`` k > 1 (streamed shards),
    worker ``w`` takes part ``anchor + w`` modulo k of ``order.worker_parts`` and the done
    batches are ``order.delivered``'s. ``total``: the batches of this rank, once known."""

    epoch: int
    base: list = dataclasses.field(default_factory=list)
    done: int = 0
    anchor: int = 0
    workers: int = 1
    total: int | None = None

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total


def _grouped(src: ArraySource, share: torch.Tensor, numbers: range, size: int, normalise,
             pools: dict[torch.dtype, BufferPool]):
    """The batches ``numbers`` (consecutive) of ``share``, gathered (and ``normalise``d unless
    that is None) about ``GROUP_SAMPLES`` samples at a time: at small batch sizes the cost is
    per call, not per byte. Each batch is a slice of a group tensor from ``pools`` (by dtype),
    never written again while any batch of it is alive."""
    group = max(1, GROUP_SAMPLES // size)
    for start in range(0, len(numbers), group):
        part = numbers[start:start + group]
        idx = share[part[0] * size:(part[-1] + 1) * size]
        x, y = src.gather(idx, pools[src.dtype].take(len(idx)))
        if normalise is not None:
            x = normalise(x, out=pools[torch.float32].take(len(idx)))
        yield from zip(x.split(size), y.split(size), strict=True)


def _loader_states(state) -> tuple[list, int]:
    """The loader states in ``state`` and the batches yielded since they were taken: itself
    (0), or those a torchdata ``StatefulDataLoader`` holds (one per worker, or its dataset's
    when it has no workers) and its steps since its last snapshot."""
    if not isinstance(state, dict) or "version" in state:
        return [state], 0
    if "dataset_state" in state:  # StatefulDataLoader without workers
        return [state["dataset_state"]], 0
    snapshot, since = state.get("_snapshot"), state.get("_steps_since_snapshot", 0)
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("_worker_snapshots"), dict) \
            or not isinstance(since, int) or since < 0:
        return [state], 0  # refused by check_state, naming what it is
    return [w.get("dataset_state") if isinstance(w, dict) else w
            for w in snapshot["_worker_snapshots"].values()], since


def _distributed(rank, world_size) -> tuple[int, int]:
    """(rank, world_size) from the arguments, else the initialised process group, else (0, 1)."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if not isinstance(world_size, int) or world_size < 1:
        raise FastMNISTError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise FastMNISTError(f"rank {rank!r} is out of range for world_size {world_size}")
    return rank, world_size


def _remove_dir(path: Path, owner: int) -> None:
    """Remove ``path`` if this is process ``owner`` (not a forked copy of it)."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)
