"""``FastMNISTLoader``: a drop-in for the tutorial ``DataLoader`` over a converted shard set.

The loader is the public surface: argument checks, what a ``DataLoader`` offers, and
``__iter__``. Where batches come from is a source's business (``loading/sources.py``),
which samples each rank and worker visits and where an epoch stands is the plan's
(``loading/plan.py``), and how batches reach the device is the delivery's
(``loading/delivery.py``).
"""

import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import FastMNISTError
from .loading import augment, delivery, select
from .loading.compat import EpochSampler, SplitDataset
from .loading.plan import EpochPlan
from .loading.sources import mixture_places, open_mixture, open_source
from .remote.transport import DEFAULT_RETRY, Retry

WORKER_WARNING = (
    "FastMNISTLoader runs in a DataLoader worker, where it has nothing to gain: a batch of "
    "mapped arrays takes microseconds to gather, and each one now crosses a process boundary "
    "(about 1 ms; see docs/benchmarks.md). Iterate the loader directly; use "
    "device='cuda' for pinned, overlapped copies to the GPU.")


_CLAIMS = threading.Lock()  # makes a loader's check-and-claim of its iterating thread one step


class FastMNISTLoader(IterableDataset):
    """Shuffled batches of a converted split, exactly once per epoch, resumable.

    Example::

        loader = FastMNISTLoader("shards/mnist", split="train", batch_size=64, shuffle=True)
        for x, y in loader:  # one epoch; x float32 [64, 1, 28, 28], y int64 [64]
            ...

    Each ``iter()`` is one epoch of batches ``(x, y)``: x float32 ``[B, 1, 28, 28]``,
    normalised exactly as ``ToTensor()`` then ``Normalize((mean,), (std,))`` computes it
    (uint8 with ``normalize=False``), y int64 ``[B]`` (``[B, 8]`` for ``qmnist-extended``).
    ``len(loader)`` is the number of batches. Iterate it directly, or wrap it in
    ``DataLoader(loader, batch_size=None, num_workers=k)``: the batches and their order are
    the same.

    Args:
        path: a converted set's directory; or WebDataset shards by URL (``http(s)://``,
            ``file://``, ``pipe:``, or any fsspec URL such as ``s3://``): the set's URL
            ending in "/", or the split's shard URLs (a list or a brace pattern) with the
            set's ``manifest.json`` beside them.
        split: the split to read ("train", "test", ...).
        batch_size: samples per batch; the last batch of a rank is shorter unless
            ``drop_last``.
        shuffle: a fresh permutation each epoch; False visits the samples in order.
        seed: the order of epoch ``e`` is a pure function of ``(seed, e)``, the same on
            every rank and in every run.
        drop_last: drop the last, short batch (and, across ranks, the tail that does not
            divide evenly), as ``DataLoader`` and ``DistributedSampler`` do.
        rank: this process's rank; default: that of the initialised
            ``torch.distributed`` process group, else 0.
        world_size: the number of ranks sharing each epoch; default: the process group's
            size, else 1. Ranks split each epoch as ``DistributedSampler`` does (padding by
            repetition, or dropping the tail with ``drop_last``), so every rank gets
            ``len(loader)`` batches.
        device: where batches are delivered, "cpu" or a CUDA device. On CUDA, host
            batches are gathered into pinned buffers and copied on a side stream
            ``prefetch`` batches ahead; uint8 images are normalised on the GPU.
        images: which stored images to read: "float32" (pre-normalised; the default on
            the CPU) or "uint8" (normalised per batch on ``device``: the default on CUDA,
            4x fewer bytes to copy, and for sets converted with ``--no-float32``). Both
            give the same bits.
        normalize: False yields the uint8 images as stored.
        resident: copy the whole split onto ``device`` once and gather there.
        pin_memory: put host batches in pinned memory (with ``device="cpu"``, for a loop that
            copies them to a GPU itself); default: no (``device="cuda"`` stages its copies in
            pinned memory whatever this says). Never inside a DataLoader worker, whose batches
            reach the main process through shared memory: give the DataLoader
            ``pin_memory=True`` instead.
        prefetch: batches copied ahead to CUDA, and shards fetched ahead when streaming.
        verify: check every file's sha256 against the manifest when opening (streamed
            shards: as each arrives); sizes and the tar layout are always checked.
        format: "npy" (memory-mapped arrays) or "wds" (tar shards); default: npy where the
            set has it. Local tar shards are decoded once, on first use, then read like the
            arrays, in the same order. Shards from URLs stream a shard at a time in another
            order: shards shuffled, then samples within each shard; ranks take consecutive
            runs of it, so each rank fetches only the shards its run covers.
        even: False gives ranks disjoint shares with no padding or dropping (exact
            evaluation; batch counts may then differ by one between ranks).
        retry: how remote fetches ride out transient failures (``fastmnist.Retry``).
        storage_options: passed to fsspec for fsspec URLs (endpoint_url, key, secret, ...).
        locality: for a local set larger than the page cache, visit it in
            ``order.block_order`` (blocks of ``locality`` consecutive samples shuffled, then
            samples shuffled within windows of 8 blocks) instead of a full permutation.
        transform: your torchvision augmentation, v1 or v2, exactly as you would give it to
            ``torchvision.datasets.MNIST``, e.g. ``Compose([RandomAffine(10, (0.1, 0.1)),
            ToTensor(), Normalize((0.1307,), (0.3081,))])``: replayed per sample, batched,
            each sample's parameters a pure function of ``(seed, epoch, sample index)``
            (``augmentation_params`` returns them). Supported: ``RandomAffine``,
            ``RandomRotation``, ``RandomCrop`` (constant padding), ``RandomPerspective``,
            ``ElasticTransform``, ``RandomErasing`` (after ``Normalize``), and the conversion
            to float with the set's own ``Normalize``; anything else is refused. Leave it None
            for evaluation.
        indices: visit only these sample indices of the split (any integer sequence, no
            repeats): each once per epoch, shuffled among themselves (ascending without
            ``shuffle``), split across ranks like the whole split. ``fastmnist.holdout``
            makes validation parts to give here.
        classes: visit only the samples of these classes (of ``indices``, if given).
        per_class: visit only the first ``per_class`` samples of each class, in index order
            (of those ``indices``/``classes`` choose).
        weights: per-sample weights (``N`` floats >= 0): each epoch is ``num_samples`` draws,
            as ``WeightedRandomSampler(weights, num_samples, replacement)`` draws, from a
            generator seeded by ``(seed, epoch)``; within ``indices``/``classes``/``per_class``
            when given. Needs a local set.
        class_weights: as ``weights``, one weight per class (a sequence of ``num_classes``,
            or ``{class: weight}``).
        balanced: as ``class_weights``, each class weighted by 1 / its count, so every class
            is drawn equally often.
        num_samples: draws per epoch with ``weights``/``class_weights``/``balanced``
            (default: as many as the samples chosen).
        replacement: draw with replacement (a sample may come more than once per epoch) or
            without.
        mix_with: other parts to mix with this split: a list of sets' paths (their train
            split) or ``(path, split)`` pairs, local, with the same image dtype and the same
            mean/std. Their samples follow this split's in the index space that
            ``augmentation_params`` and ``rank_order`` use.
        proportions: with ``mix_with``, each part's share of an epoch (this split first):
            fractions adding up to 1 of ``num_samples`` (default: all parts' samples
            together), or per-epoch counts. Each part is drawn in passes over it (a fresh
            permutation each, running on across epochs: every sample of a part comes once
            before any comes twice); the epoch's draws are then shuffled together. Default:
            each part's size (every sample once per epoch).

    Like a ``DataLoader`` it has ``dataset`` (``len()`` is the split's sample count;
    indexing gives one normalised sample), ``sampler`` (``set_epoch``; ``len()`` is this
    rank's samples per epoch), ``batch_size``, ``drop_last``, ``num_workers`` and
    ``pin_memory``; and ``state_dict``/``load_state_dict`` as torchdata's
    ``StatefulDataLoader`` has them.
    """

    num_workers = 0  # batches are made in the calling process (wrap it in a DataLoader for workers)

    def __init__(self, path: str | os.PathLike | list[str], split: str = "train", batch_size: int = 64,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, *, rank: int | None = None,
                 world_size: int | None = None, device: str | torch.device = "cpu",
                 images: str | None = None, normalize: bool = True, resident: bool = False,
                 pin_memory: bool | None = None, prefetch: int = 2, verify: bool = False,
                 format: str | None = None, even: bool = True, retry: Retry | None = None,
                 storage_options: dict | None = None, locality: int | None = None,
                 transform: Callable | None = None, indices: Sequence[int] | None = None,
                 classes: Sequence[int] | None = None, per_class: int | None = None,
                 weights: Sequence[float] | None = None, class_weights: Sequence[float] | dict | None = None,
                 balanced: bool = False, num_samples: int | None = None, replacement: bool = True,
                 mix_with: list | None = None, proportions: Sequence[float] | None = None):
        _check_arguments(batch_size=batch_size, prefetch=prefetch, seed=seed, locality=locality,
                         shuffle=shuffle, drop_last=drop_last, normalize=normalize, resident=resident,
                         verify=verify, even=even, pin_memory=pin_memory, images=images, format=format)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise FastMNISTError(f"device must be 'cpu' or a CUDA device ('cuda', 'cuda:1', ...), "
                                 f"got {device!r}") from None
        if self.device.type not in ("cpu", "cuda"):
            raise FastMNISTError(f"device={device!r}: FastMNISTLoader delivers batches to the CPU or to a "
                                 f"CUDA device; for {self.device.type}, iterate on the CPU and move each "
                                 f"batch yourself (x.to({str(self.device)!r}))")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FastMNISTError(f"device={device!r} asked for, but CUDA is not available here")
        if self.device.type == "cuda" and self.device.index is None:  # fixed now, for every part
            self.device = torch.device("cuda", torch.cuda.current_device())
        if pin_memory is None:
            pin_memory = self.device.type == "cuda"
        elif pin_memory and not torch.cuda.is_available():
            raise FastMNISTError("pin_memory=True needs CUDA, which is not available here")
        rank, world_size = _distributed(rank, world_size)
        if transform is not None:
            if not normalize or images == "float32":
                raise FastMNISTError("transform= resamples the uint8 images, then normalises them: it needs "
                                     "normalize=True and images='uint8' (the default with a transform)")
            images = "uint8"
        places = [(path, split), *mixture_places(mix_with)]
        opened = [open_source(where, part, images, normalize, self.device, resident, verify, format, locality,
                              retry or DEFAULT_RETRY, storage_options, prefetch) for where, part in places]
        self.source = opened[0] if mix_with is None else open_mixture(opened, places, normalize, resident)
        self._augment = None if transform is None else augment.parse(transform, self.source.info.mean,
                                                                      self.source.info.std, seed)
        self.info = self.source.info
        self.format = self.source.format
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.even = rank, world_size, even
        self.normalize, self.resident, self.pin_memory = normalize, resident, pin_memory
        self._iterating = None  # (process, thread) iterating an epoch now
        self.selection = select.choose(self.source, self._labels, shuffle, indices, classes, per_class,
                                       weights, class_weights, balanced, num_samples, replacement,
                                       proportions)
        self._plan = EpochPlan(self.source, batch_size, shuffle, seed, drop_last, rank, world_size, even,
                               self.selection)
        self._delivery = delivery.choose(self.source, self.device, normalize, resident,
                                         pin_memory and self.device.type == "cpu", prefetch, self._augment)

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return len(self._plan)

    def _labels(self):
        """int64 ``(N,)`` class labels of the split (``(N, 8)`` for qmnist-extended), mapped."""
        if not self.source.random_access:
            raise FastMNISTError("choosing samples by class needs the labels of a local set; streamed "
                                 "shards are read a shard at a time (indices= works with them)")
        return self.source.tensors[1].numpy()

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank visits per epoch (padding included, dropped tail excluded)."""
        return self._plan.samples_per_rank

    @property
    def dataset(self) -> SplitDataset:
        """The split as a map-style dataset, as ``DataLoader.dataset``: ``len()`` samples."""
        return SplitDataset(self)

    @property
    def sampler(self) -> EpochSampler:
        """As ``DataLoader.sampler`` with a ``DistributedSampler``: ``set_epoch``, ``len()``."""
        return EpochSampler(self._plan)

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` runs, or continues after ``load_state_dict`` of a
        state taken mid-epoch: a training loop's ``while loader.epoch < epochs`` resumes right."""
        return self._plan.take_over()

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run ``epoch`` (as ``DistributedSampler.set_epoch``); a
        loaded state of another epoch is dropped."""
        self._plan.set_epoch(epoch)

    def rank_order(self, epoch: int) -> torch.Tensor:
        """int64 ``(samples_per_rank,)``: the sample indices this rank visits in ``epoch``, in order."""
        return self._plan.rank_order(epoch)

    def augmentation_params(self, epoch: int, indices) -> list[dict]:
        """The augmentation of the samples ``indices`` (int64 sample indices, any order) in
        ``epoch``: one dict per random step of ``transform``, its ``"transform"`` name and
        one tensor row per sample of the parameters torchvision's functional op takes
        (``angle``, ``translate``, ``scale``, ``shear``; ``top``, ``left``; ``endpoints``;
        ``displacement``; ``i``, ``j``, ``h``, ``w``; ``applied``)."""
        if self._augment is None:
            raise FastMNISTError("this loader has no transform")
        return self._augment.params(epoch, indices)

    def as_dataloader(self, **options) -> DataLoader:
        """This loader inside a real ``torch.utils.data.DataLoader``, for trainers that take
        nothing else (Lightning Fabric's ``setup_dataloaders``): ``batch_size=None``, so its
        batches pass through as they are. The split stays this loader's: a trainer that
        re-creates the DataLoader keeps the loader as its dataset, and no sampler can be set
        on an iterable dataset. ``options`` go to ``DataLoader`` (``num_workers``, ...; with
        workers, resume through torchdata's ``StatefulDataLoader`` instead). Save and load
        this loader's own ``state_dict`` in checkpoints: with no workers the DataLoader takes
        one batch from it per step, so its state is the step's."""
        return DataLoader(self, batch_size=None, **options)

    def state_dict(self) -> dict:
        """Where the epoch stands, the same on every rank of a job in step: the epoch, the
        positions of its order consumed (``[start, stop)`` intervals: a few numbers, however
        large the set), what identifies the set, seed and shuffle, and the step layout that
        lets the same configuration continue batch for batch. JSON-serialisable; O(1)."""
        return self._plan.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Make the next ``iter()`` continue the epoch ``state`` describes: from this loader's
        ``state_dict()`` on any rank (of this or another world size, batch size or worker
        count), or from a torchdata ``StatefulDataLoader``'s ``state_dict()`` over a loader
        of the same set. Every sample not yet consumed comes exactly once across the ranks
        (padded or cut as ``even``/``drop_last`` say); with the same world size, batch size
        and split rules, the batches are those the interrupted run would have yielded.
        A state of another set, seed or order is refused with a ``FastMNISTError``."""
        self._plan.load_state_dict(state, in_worker=get_worker_info() is not None)

    def close(self) -> None:
        """Release the set's files now (a stream's fetches and scratch directory too) rather
        than when the loader is collected; iterating it afterwards is refused. A loader is
        also a context manager: ``with FastMNISTLoader(...) as loader:``."""
        self.source.close()

    def __enter__(self) -> "FastMNISTLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The next epoch's batches. One thread at a time: a second thread's ``iter()``
        while another thread's epoch is under way is refused; so is a wrapper that would
        split this rank's batches across the ranks again (``RESPLITTERS``)."""
        self._check_thread()
        _refuse_collating(self)
        if self.world_size > 1:
            _refuse_resplitting()
        if self.source.closed:
            raise FastMNISTError("this loader was closed; make a new FastMNISTLoader")
        return self._epoch()

    def _check_thread(self, claim: bool = False) -> None:
        """Refuse a thread other than the one iterating (in this process); with ``claim``,
        become that thread."""
        me = (os.getpid(), threading.get_ident())
        with _CLAIMS:
            owner = self._iterating
            if owner is not None and owner[0] == me[0] and owner != me:
                raise FastMNISTError("this loader is being iterated by another thread; give each thread its "
                                     "own FastMNISTLoader (they share the page cache)")
            if claim:
                self._iterating = me

    def _epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._check_thread(claim=True)
        try:
            yield from self._batches()
        finally:
            with _CLAIMS:
                self._iterating = None

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        if worker is not None and (self.device.type == "cuda" or self.resident):
            made = f"device={str(self.device)!r}" if self.device.type == "cuda" else "resident=True"
            raise FastMNISTError(
                f"a loader with {made} cannot run in a DataLoader worker (a worker process cannot hand "
                "CUDA tensors or a resident copy to the main process cheaply): iterate the loader itself, "
                "which prefetches to the GPU on a side stream; or make it with device='cpu' and give the "
                "DataLoader pin_memory=True")
        k, w = (1, 0) if worker is None else (worker.num_workers, worker.id)
        if w == 0 and worker is not None and self.source.random_access:
            warnings.warn(WORKER_WARNING, stacklevel=2)
        # the workers of one pass of a DataLoader share its base seed, a new one each pass
        epoch_pass = self._plan.start(w, k, None if worker is None else worker.seed - worker.id)
        for number, batch in zip(epoch_pass.numbers, self._delivery.batches(epoch_pass), strict=True):
            epoch_pass.yielded(number)
            yield batch
        epoch_pass.finish()


# Modules whose wrappers iterate a dataset on one rank and divide what it yields among all
# ranks, or keep every world_size-th batch on each, so that with this loader's own split each
# rank would get 1/world_size of its share; and what to do instead.
RESPLITTERS = {
    "accelerate.data_loader": "Accelerate's prepared DataLoader divides the batches among the processes "
    "again, on top of this loader's split by rank (each rank would get 1/world_size of its share): "
    "give accelerator.prepare() the FastMNISTLoader itself, which it hands back unchanged",
}


def _refuse_collating(loader) -> None:
    """Raise if ``iter()`` comes from a DataLoader that would stack the loader's batches
    (one whose ``batch_size`` is not None): its fetcher, made in the process that iterates,
    calls ``iter()`` from its ``__init__`` and says whether it collates."""
    fetcher = sys._getframe(2).f_locals.get("self")
    if getattr(fetcher, "auto_collation", False) and getattr(fetcher, "dataset", None) is loader:
        raise FastMNISTError(
            "FastMNISTLoader yields whole batches, and this DataLoader would stack batch_size of them "
            "into one ([batch_size, B, 1, 28, 28]): wrap it as DataLoader(loader, batch_size=None, ...) "
            "or use loader.as_dataloader(...); the loader's own batch_size sets the batch")


def _refuse_resplitting(depth: int = 12) -> None:
    """Raise if one of the ``depth`` callers of ``iter()`` is a ``RESPLITTERS`` wrapper."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return
        advice = RESPLITTERS.get(frame.f_globals.get("__name__", ""))
        if advice is not None:
            raise FastMNISTError(advice)
        frame = frame.f_back


def _check_arguments(**given) -> None:
    """Refuse an argument of the wrong type or range, naming it: ``shuffle="no"`` would
    otherwise shuffle (a non-empty string is true) and ``seed=None`` fail at the first batch."""
    def integer(value, least):
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    for name in ("shuffle", "drop_last", "normalize", "resident", "verify", "even"):
        if not isinstance(given[name], bool):
            raise FastMNISTError(f"{name} must be True or False, got {given[name]!r}")
    if given["pin_memory"] is not None and not isinstance(given["pin_memory"], bool):
        raise FastMNISTError(f"pin_memory must be True, False or None, got {given['pin_memory']!r}")
    for name, least in (("batch_size", 1), ("prefetch", 1), ("seed", 0)):
        if not integer(given[name], least):
            what = "a non-negative integer" if least == 0 else "a positive integer"
            raise FastMNISTError(f"{name} must be {what}, got {given[name]!r}")
    if given["locality"] is not None and not integer(given["locality"], 1):
        raise FastMNISTError(f"locality must be a positive number of samples or None, "
                             f"got {given['locality']!r}")
    for name, allowed in (("images", ("float32", "uint8")), ("format", ("npy", "wds"))):
        if given[name] is not None and given[name] not in allowed:
            raise FastMNISTError(f"{name} must be {' or '.join(map(repr, allowed))} or None, "
                                 f"got {given[name]!r}")


def _distributed(rank, world_size) -> tuple[int, int]:
    """(rank, world_size) from the arguments, else the initialised process group, else (0, 1).

    A process that a launcher started as one of several (``WORLD_SIZE`` > 1, as torchrun and
    ``accelerate launch`` set it) with no process group is refused: it would read the whole set,
    as would each of the others, and train on every sample several times an epoch."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size() if world_size is None else world_size
        rank = dist.get_rank() if rank is None else rank
    elif rank is None and world_size is None:
        launched = os.environ.get("WORLD_SIZE", "1")
        if launched.strip() not in ("", "1"):
            raise FastMNISTError(
                f"this process was launched as one of WORLD_SIZE={launched} processes, but no "
                f"torch.distributed process group is initialised, so each would read the whole set: "
                f"initialise it before making the loader (torch.distributed.init_process_group(); with "
                f"Accelerate on a machine without GPUs, Accelerator(cpu=True)), or pass rank= and "
                f"world_size=")
        rank, world_size = 0, 1
    elif world_size is None:
        world_size = 1
    elif rank is None and isinstance(world_size, int) and world_size > 1:
        raise FastMNISTError(f"world_size={world_size!r} without rank=: give both, or neither to take them "
                             f"from the process group")
    elif rank is None:
        rank = 0
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise FastMNISTError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise FastMNISTError(f"rank {rank!r} is out of range for world_size {world_size}")
    return rank, world_size
