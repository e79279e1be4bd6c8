"""``FastMNISTLoader``: a drop-in for the tutorial ``DataLoader`` over a converted shard set.

The loader owns the arguments, epochs and resume, the split across ranks and DataLoader
workers, and delivery (CPU, pinned, or copied ahead to CUDA); where batches come from is
a source's business (``sources.py``).
"""

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .compat import EpochSampler, SplitDataset
from .device import prefetch_to_cuda
from .errors import FastMNISTError
from .normalize import normalizer
from .order import batch_count, rank_share, samples_per_rank
from .sources import ArraySource, StreamSource, empty_batch, local_arrays
from .store import Split, open_remote, open_shards
from .transport import is_url

_STATE_KEYS = ("seed", "num_samples", "batch_size", "shuffle", "drop_last", "rank", "world_size")


class FastMNISTLoader(IterableDataset):
    """Batches ``(x, y)`` of a split: x float32 ``[B, 1, 28, 28]`` normalised exactly like
    ``ToTensor()`` + ``Normalize((mean,), (std,))`` (uint8 if ``normalize=False``), y int64
    ``[B]``. Iterate it directly, or wrap it in ``DataLoader(loader, batch_size=None,
    num_workers=k)``; either way the batches and their order are the same.

    Order: a fresh permutation per epoch from ``(seed, epoch)``; each ``iter()`` starts the
    next epoch unless ``set_epoch`` chose one. Ranks split each epoch as
    ``DistributedSampler`` does (padding by repetition, or dropping the tail with
    ``drop_last``), so every rank gets ``len(loader)`` batches.

    ``path``: a converted set's directory, or WebDataset shards by URL (``http(s)://``,
    ``file://``, ``pipe:``): the set's URL ending in "/", or shard URLs (a list or a brace
    pattern) with the set's ``manifest.json`` beside them.
    ``format``: "npy" or "wds" (tar shards); default npy where the set has it. Local tar
    shards are validated and decoded once, on first use, then read like the arrays, in the
    same order. Shards from URLs stream a shard at a time (``prefetch`` fetched ahead, the
    next epoch's first ones included) in a different order: shards shuffled, then samples
    shuffled within each shard; ranks take consecutive runs of it, so each rank fetches
    only the shards its run covers.
    ``source``: which data to read, "float32" (pre-normalised; the default on the CPU) or
    "uint8" (normalised on ``device``; the default on CUDA: 4x fewer bytes to copy).
    ``resident``: copy the whole split onto ``device`` once and gather there.
    ``pin_memory``: put host batches in pinned memory (default: when CUDA is available).

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
                 prefetch: int = 2, verify: bool = False, format: str | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise FastMNISTError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FastMNISTError(f"device={device!r} asked for, but CUDA is not available here")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        elif pin_memory and not torch.cuda.is_available():
            raise FastMNISTError("pin_memory=True needs CUDA, which is not available here")
        if source is None:
            source = "uint8" if self.device.type == "cuda" or not normalize else "float32"
        if source not in ("float32", "uint8") or (source == "float32" and not normalize):
            raise FastMNISTError(f"source must be 'float32' or 'uint8' (uint8 when "
                                 f"normalize=False), got {source!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise FastMNISTError(f"prefetch must be a positive integer, got {prefetch!r}")
        rank, world_size = _distributed(rank, world_size)
        if is_url(path):
            if resident or format not in (None, "wds"):
                raise FastMNISTError("shard URLs stream tar shards: format='wds' only, and "
                                     "resident=True needs a local set")
            self.info, self._urls = open_remote(path, split)
            self._root, self.format = None, "wds"
        else:
            local = open_shards(path, verify=verify).split(split)
            self.info, self._urls, self._root = local.info, None, local.root
            self.format = format or local.formats[0]
            if self.format not in local.formats:
                raise FastMNISTError(f"{path}: split {split!r} has no {self.format!r} data "
                                     f"(it has {', '.join(local.formats)})")
            array = "images_f32" if source == "float32" else "images_u8"
            if self.format == "npy" and array not in self.info.arrays:
                raise FastMNISTError(f"{path}: split {split!r} has no {array} array for "
                                     f"source={source!r}")
        self.verify = verify
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.source, self.normalize, self.resident = source, normalize, resident
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self._next_epoch, self._resume_at = 0, 0
        self._epoch, self._position = 0, None  # of the iteration in progress
        self._batch_source = None  # made on first use in each process

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return batch_count(self.samples_per_rank, self.batch_size, self.drop_last)

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank visits per epoch (padding included, dropped tail excluded)."""
        return samples_per_rank(self.info.count, self.world_size, self.drop_last)

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
                                                  (self.info.mean, self.info.std) if on_cpu else None)
            else:
                self._batch_source = local_arrays(Split(self._root, self.info), self.format, self.source,
                                                  self.device if self.resident else None)
        return self._batch_source

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self._next_epoch = epoch

    def state_dict(self) -> dict:
        """Where this loader stands: the epoch and the batches already yielded in it."""
        if self._position is not None and self._position < len(self):
            epoch, done = self._epoch, self._position
        else:  # between epochs, or loaded and not yet resumed
            epoch, done = self._next_epoch, self._resume_at
        return {"epoch": epoch, "batches_done": done, "seed": self.seed,
                "num_samples": self.info.count, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Make the next ``iter()`` continue where ``state`` stood. With DataLoader workers,
        load it before creating the DataLoader iterator."""
        mine = self.state_dict()
        for key in _STATE_KEYS:
            if key in state and state[key] != mine[key]:
                raise FastMNISTError(f"state_dict was saved with {key}={state[key]!r}, "
                                     f"this loader has {key}={mine[key]!r}")
        if not 0 <= state["batches_done"] <= len(self):
            raise FastMNISTError(f"batches_done={state['batches_done']} is outside 0..{len(self)}")
        self._next_epoch, self._resume_at = state["epoch"], state["batches_done"]

    def rank_order(self, epoch: int) -> torch.Tensor:
        """int64 sample indices this rank visits in ``epoch``, in order."""
        src = self.batch_source
        return rank_share(src.order(self.seed, epoch, self.shuffle), self.rank, self.world_size,
                          self.drop_last, blocks=src.blocks)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._next_epoch, self._resume_at
        self._next_epoch, self._resume_at = epoch + 1, 0
        self._epoch, self._position = epoch, start
        src = self.batch_source
        # DataLoader workers take batches round-robin, as the DataLoader collects them.
        worker = get_worker_info()
        first, step = (start, 1) if worker is None else (start + worker.id, worker.num_workers)
        index_batches = src.index_batches(self.rank_order(epoch), range(first, len(self), step),
                                          self.batch_size, lambda: self.rank_order(epoch + 1))
        normalise = None
        if self.normalize and src.dtype == torch.uint8:
            normalise = normalizer(self.info.mean, self.info.std, self.device)
        if self.device.type == "cuda" and not self.resident:
            batches = prefetch_to_cuda(index_batches, src.gather, src.dtype, self.batch_size,
                                       self.device, self.prefetch, normalise or (lambda x: x))
        else:
            pin = self.pin_memory and self.device.type == "cpu"

            def finish(x):  # normalising makes a new tensor: pin that one
                if normalise is None:
                    return x
                return normalise(x).pin_memory() if pin else normalise(x)

            batches = ((finish(x), y) for x, y in (
                src.gather(idx, *empty_batch(src.dtype, len(idx), pin=True) if pin else ())
                for idx in index_batches))
        for batch in batches:
            self._position += 1
            yield batch

    def __getstate__(self):
        # Workers map the files themselves and share the page cache; never pickle arrays.
        return {**self.__dict__, "_batch_source": None}


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
