"""``FastMNISTLoader``: a drop-in for the tutorial ``DataLoader`` over a converted shard set."""

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .device import prefetch_to_cuda
from .errors import FastMNISTError
from .normalize import normalize_u8, normalizer
from .order import batch_count, epoch_order, rank_share, samples_per_rank, shard_order
from .store import MANIFEST, Split, open_shards, parse_manifest
from .wds import ShardCache, decode_shard, expand_urls, fetch, is_url

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
    """

    def __init__(self, path, split: str = "train", batch_size: int = 64, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, *, rank: int | None = None,
                 world_size: int | None = None, device="cpu", source: str | None = None,
                 normalize: bool = True, resident: bool = False, pin_memory: bool | None = None,
                 prefetch: int = 2, verify: bool = False, format: str | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
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
        if prefetch < 1:
            raise FastMNISTError(f"prefetch must be at least 1, got {prefetch!r}")
        rank, world_size = _distributed(rank, world_size)
        self.streaming = is_url(path)
        if self.streaming:
            if resident or format not in (None, "wds"):
                raise FastMNISTError("shard URLs stream tar shards: format='wds' only, and "
                                     "resident=True needs a local set")
            self.split, self._shards = _remote_split(path, split)
            self.format = "wds"
        else:
            self.split = open_shards(path, verify=verify).split(split)
            self.format = format or self.split.formats[0]
            if self.format not in self.split.formats:
                raise FastMNISTError(f"{path}: split {split!r} has no {self.format!r} data "
                                     f"(it has {', '.join(self.split.formats)})")
            self._shards = [{**s, "url": str(self.split.root / s["file"])}
                            for s in self.split.info.get("wds", {}).get("shards", [])]
        self.verify = verify
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.source, self.normalize, self.resident = source, normalize, resident
        self.pin_memory, self.prefetch = pin_memory, prefetch
        self._next_epoch, self._resume_at = 0, 0
        self._epoch, self._position = 0, None  # of the iteration in progress
        self._data = None  # see _source(); made on first use in each process

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        per_rank = samples_per_rank(self.split.count, self.world_size, self.drop_last)
        return batch_count(per_rank, self.batch_size, self.drop_last)

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
                "num_samples": self.split.count, "batch_size": self.batch_size,
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._next_epoch, self._resume_at
        self._next_epoch, self._resume_at = epoch + 1, 0
        self._epoch, self._position = epoch, start
        gather, images, normalise, cache = self._source()
        order = self._order(epoch, cache is not None).to(images.device)
        # DataLoader workers take batches round-robin, as the DataLoader collects them.
        worker = get_worker_info()
        first, step = (start, 1) if worker is None else (start + worker.id, worker.num_workers)
        bs, numbers = self.batch_size, range(first, len(self), step)
        if cache is not None:  # near the end, fetch the shards the next epoch starts with
            index_batches = cache.index_batches(order, numbers, bs, then=self._order(epoch + 1, True))
        else:
            index_batches = (order[b * bs:(b + 1) * bs] for b in numbers)

        if self.device.type == "cuda" and not self.resident:
            batches = prefetch_to_cuda(index_batches, gather, images, bs, self.device,
                                       self.prefetch, normalise or (lambda x: x))
        else:
            pin = self.pin_memory and self.device.type == "cpu"

            def finish(x):  # normalising makes a new tensor: pin that one
                if normalise is None:
                    return x
                return normalise(x).pin_memory() if pin else normalise(x)

            batches = ((finish(x), y) for x, y in (
                gather(idx, *_pinned_like(images, len(idx)) if pin else ())
                for idx in index_batches))
        for batch in batches:
            self._position += 1
            yield batch

    def _order(self, epoch: int, streaming: bool) -> torch.Tensor:
        """int64 sample indices this rank visits in ``epoch``."""
        if streaming:
            order = shard_order([s["count"] for s in self._shards], self.seed, epoch, self.shuffle)
        else:
            order = epoch_order(self.split.count, self.seed, epoch, self.shuffle)
        return rank_share(order, self.rank, self.world_size, self.drop_last, blocks=streaming)

    def _source(self):
        """(gather, images, normalise, cache), made once per process: ``gather(idx,
        x_out=None, y_out=None)`` returns the images and int64 labels of samples ``idx``;
        ``images`` is shaped and typed like them, on the device gathering runs on;
        ``normalise`` maps uint8 batches on ``device`` to float32, or is None; ``cache`` is
        the ShardCache of streamed shards, or None."""
        if self._data is None:
            mean, std = self.split.mean, self.split.std
            if self.streaming:  # tar shards hold uint8; on the CPU, normalised while gathered
                on_cpu = self.normalize and self.device.type == "cpu"
                normalise = normalizer(mean, std, self.device) if self.normalize and not on_cpu else None
                cache = ShardCache(self._shards, self.prefetch, self.verify, (mean, std) if on_cpu else None)
                example = torch.empty((0, 1, 28, 28), dtype=torch.float32 if on_cpu else torch.uint8)
                self._data = cache.gather, example, normalise, cache
            else:
                normalise = None
                if self.source == "uint8" and self.normalize:
                    normalise = normalizer(mean, std, self.device)
                images, labels = self._arrays()
                if self.resident:
                    images = images.to(self.device, copy=True)
                    labels = labels.to(self.device, copy=True)

                def gather(idx, x_out=None, y_out=None):
                    return (torch.index_select(images, 0, idx, out=x_out),
                            torch.index_select(labels, 0, idx, out=y_out))

                self._data = gather, images, normalise, None
        return self._data

    def _arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split: images ``(N,1,28,28)`` of ``source`` dtype, int64 labels ``(N,)``;
        memory-mapped from the arrays, or decoded once from local tar shards."""
        if self.format == "npy":
            array = "images_u8" if self.source == "uint8" else "images_f32"
            # copy-on-write mappings: writable for torch, and never written back
            return (torch.from_numpy(self.split.array(array, mode="c")),
                    torch.from_numpy(self.split.array("labels", mode="c")))
        parts = [decode_shard(fetch(s["url"], s["size"]), s["count"], s["url"])
                 for s in self._shards]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        if self.source == "float32":  # tar shards hold uint8 images: normalise them once
            images = normalize_u8(images, self.split.mean, self.split.std)
        return images, torch.from_numpy(np.concatenate([p[1] for p in parts]))

    def __getstate__(self):
        # Workers map the files themselves and share the page cache; never pickle arrays.
        return {**self.__dict__, "_data": None}


def _remote_split(path, split: str) -> tuple[Split, list[dict]]:
    """The split's metadata and shard list (url, first, count, sha256) from shard URLs, or
    from a set URL ending in "/", with the set's manifest fetched from beside them."""
    urls = expand_urls(path)
    whole_set = len(urls) == 1 and urls[0].endswith("/")
    base = urls[0] if whole_set else urls[0].rsplit("/", 1)[0] + "/"
    manifest = parse_manifest(fetch(base + MANIFEST), base + MANIFEST)
    if split not in manifest["splits"]:
        raise FastMNISTError(f"{base}{MANIFEST}: no split {split!r}")
    info = manifest["splits"][split]
    listed = info.get("wds", {}).get("shards")
    if not listed:
        raise FastMNISTError(f"{base}{MANIFEST}: split {split!r} has no tar shards")
    given = {u.rsplit("/", 1)[-1]: u for u in urls}
    if not whole_set:
        names = {s["file"] for s in listed}
        for name, url in given.items():
            if name not in names:
                raise FastMNISTError(f"{url}: not a {split} shard of {base}{MANIFEST}")
        for name in sorted(names - set(given)):
            raise FastMNISTError(f"{base}{name}: {split} shard missing from the listing "
                                 f"(every shard is needed for an exact epoch)")
    shards = [{**s, "url": base + s["file"] if whole_set else given[s["file"]]} for s in listed]
    return Split(None, split, info), shards


def _pinned_like(images, n):
    return (torch.empty((n, *images.shape[1:]), dtype=images.dtype, pin_memory=True),
            torch.empty(n, dtype=torch.int64, pin_memory=True))


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
