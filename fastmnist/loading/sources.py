"""Where a loader's batches come from, behind one small interface, and the factory that
picks the kind: :func:`open_source`.

Every source has the split's manifest entry ``info``, its sample ``count``, the ``dtype``
of the images it gathers and the ``label_shape`` of its labels; the ``order`` of an epoch
and its ``order_name`` (recorded in states); ``consecutive``, true when ranks and
DataLoader workers should take consecutive runs of that order rather than strided
positions; ``random_access``, true when any sample can be gathered at any time;
``index_batches(epoch_pass)``, the batches of sample indices of a :class:`~.plan.Pass`
(fetching ahead what they will need); and ``gather``. A source is picklable: what it
maps, decodes or fetches is made in each process on first use, never pickled.

- :class:`ArraySource`: the whole split as tensors (memory-mapped ``.npy`` arrays, or local
  tar shards decoded once; optionally resident on a device), gathered with ``index_select``.
- :class:`StreamSource`: tar shards streamed from URLs through a :class:`ShardCache`.
- :class:`MixedSource`: the local splits of a mixture (``mix_with=``), joined in memory;
  :func:`open_mixture` checks that they agree.
"""

import hashlib
import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path

import numpy as np
import torch

from ..errors import FastMNISTError
from ..formats.idx import check_classes
from ..formats.manifest import IMAGE_SHAPE, SplitInfo, check_unlabelled
from ..formats.normalize import normalize_u8
from ..formats.tar import decode_shard
from ..remote.cache import ShardCache
from ..remote.transport import Retry, is_url
from ..store import REPLACED, Split, open_remote, open_shards
from .order import block_order, epoch_order, shard_order

IMAGE_ARRAYS = {"float32": "images_f32", "uint8": "images_u8"}  # stored images -> the .npy array
OPEN_ATTEMPTS = 5  # opens of a local set that a conversion replaced meanwhile, before giving up


def open_source(path, split: str, stored: str | None, normalize: bool, device: torch.device,
                resident: bool, verify: bool, format: str | None, locality: int | None, retry: Retry,
                storage_options: dict | None, prefetch: int) -> "ArraySource | StreamSource":
    """The source of ``split`` at ``path`` (a local set's directory, or shard URLs), with the
    ``FastMNISTLoader`` arguments of the same names; ``stored`` None picks float32 on the CPU
    and uint8 on CUDA, with ``normalize=False``, or when the set has no float32 array."""
    chosen = stored is not None
    if stored is None:
        stored = "uint8" if device.type == "cuda" or not normalize else "float32"
    if stored not in IMAGE_ARRAYS or (stored == "float32" and not normalize):
        raise FastMNISTError(f"images must be 'float32' or 'uint8' (uint8 when normalize=False), "
                             f"got {stored!r}")
    if is_url(path):
        if locality is not None:
            raise FastMNISTError("locality is for local sets: streamed shards are already read "
                                 "a shard at a time")
        if resident or format not in (None, "wds"):
            raise FastMNISTError("shard URLs stream tar shards: format='wds' only, and "
                                 "resident=True needs a local set")
        info, urls = open_remote(path, split, retry, storage_options)
        # tar shards hold uint8; on the CPU they are normalised while gathered
        mean_std = (info.mean, info.std) if normalize and device.type == "cpu" else None
        return StreamSource(info, urls, prefetch, verify, mean_std, retry, storage_options)
    for attempt in range(OPEN_ATTEMPTS):  # a conversion may replace the set while it is opened
        try:
            return _array_source(path, split, stored, chosen, device if resident else None, verify, format,
                                 locality)
        except FastMNISTError as e:
            if REPLACED not in str(e) or attempt == OPEN_ATTEMPTS - 1:
                raise


def _array_source(path, split: str, stored: str, chosen: bool, device, verify: bool, format: str | None,
                  locality: int | None) -> "ArraySource":
    """The local set's split as an ``ArraySource``, its files opened from one version."""
    local = open_shards(path, verify=verify).split(split)
    format = format or local.formats[0]
    if format not in local.formats:
        raise FastMNISTError(f"{path}: split {split!r} has no {format!r} data "
                             f"(it has {', '.join(local.formats)})")
    if format == "npy":
        if not chosen and "images_f32" not in local.info.arrays:
            stored = "uint8"  # a set converted with --no-float32: normalised per batch
        if IMAGE_ARRAYS[stored] not in local.info.arrays:
            raise FastMNISTError(f"{path}: split {split!r} has no {IMAGE_ARRAYS[stored]} array "
                                 f"for images={stored!r}")
    return ArraySource(local, format, stored, device, locality)


CHECK_ROWS = 4096  # samples compared at a time when float32 images are checked


class ArraySource:
    """A local split as tensors on one device: images ``(N, 1, 28, 28)`` float32
    (``stored``) or uint8 and int64 labels ``(N, *label_shape)``, mapped from the ``.npy``
    arrays (``format`` "npy") or decoded once from the local tar shards ("wds"), copied
    onto ``device`` unless it is None. An epoch visits them in a permutation of ``0..N-1``,
    or with ``locality`` in ``order.block_order``."""

    consecutive = False
    random_access = True

    def __init__(self, split: Split, format: str, stored: str, device: torch.device | None,
                 locality: int | None):
        self.split, self.info, self.format, self.stored = split, split.info, format, stored
        self.device, self.locality = device, locality
        self.order_name = f"blocks of {locality}" if locality else "samples"
        self.dtype = torch.float32 if stored == "float32" else torch.uint8
        names = [IMAGE_ARRAYS[stored], "labels"] if format == "npy" else [s.file for s in split.shards]
        self._checked = None  # float32 images beside uint8 ones: checked against them once, in any process
        if format == "npy" and stored == "float32" and "images_u8" in split.info.arrays:
            names.append("images_u8")
            self._checked = torch.zeros(1, dtype=torch.bool).share_memory_()
        # Held open from now on: this version of the set, whatever a conversion does to the
        # directory later; a process that unpickles this source checks it has that version.
        self._files = {name: split.open(name) for name in names}
        self._versions = {name: _version(f) for name, f in self._files.items()}
        self._tensors = None  # (images, labels), made on first use in each process
        self.closed = False
        weakref.finalize(self, _close_files, self._files)  # quietly, when collected unclosed

    def close(self) -> None:
        """Release the files and the mapped or decoded tensors of this process."""
        self.closed, self._tensors = True, None
        _close_files(self._files or {})

    @property
    def count(self) -> int:
        return self.info.count

    @property
    def label_shape(self) -> tuple[int, ...]:
        return self.info.label_shape

    def order(self, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
        if self.locality:
            return block_order(self.count, seed, epoch, shuffle, self.locality)
        return epoch_order(self.count, seed, epoch, shuffle)

    def index_batches(self, epoch_pass):
        """``share[b * batch_size:(b + 1) * batch_size]`` for each batch ``b`` of the pass, on
        the arrays' device."""
        share, size = epoch_pass.share.to(self.tensors[0].device), epoch_pass.batch_size
        return (share[b * size:(b + 1) * size] for b in epoch_pass.numbers)

    def gather(self, idx: torch.Tensor, x_out=None, y_out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of the samples ``idx``, into ``x_out``/``y_out`` when given."""
        images, labels = self.tensors
        return (torch.index_select(images, 0, idx, out=x_out),
                torch.index_select(labels, 0, idx, out=y_out))

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels, mapped or decoded on first use in this process."""
        if self.closed:
            raise FastMNISTError(f"{self.split.root}: this loader was closed; make a new FastMNISTLoader")
        if self._tensors is None:
            images, labels = self._mapped() if self.format == "npy" else self._decoded()
            if self.device is not None:
                images, labels = images.to(self.device, copy=True), labels.to(self.device, copy=True)
            self._tensors = images, labels
        return self._tensors

    def _opened(self) -> dict:
        """The source's files, opened when it was made (or, in a process that unpickled it,
        by path, and refused unless they are the same files)."""
        if self._files is None:
            self._files = {name: self.split.open(name) for name in self._versions}
            weakref.finalize(self, _close_files, self._files)
            for name, f in self._files.items():
                if _version(f) != self._versions[name]:
                    raise FastMNISTError(f"{self.split.path(name)}: {REPLACED}")
        return self._files

    def _mapped(self) -> tuple[torch.Tensor, torch.Tensor]:
        split, files = self.split, self._opened()
        name = IMAGE_ARRAYS[self.stored]
        # copy-on-write mappings: writable for torch, and never written back
        images = torch.from_numpy(split.array(name, mode="c", f=files[name]))
        labels = split.array("labels", mode="c", f=files["labels"])
        if self._checked is not None and not self._checked.item():
            _check_normalised(split, images, split.array("images_u8", f=files["images_u8"]))
            self._checked.fill_(True)  # forked workers share this: the next ones need not check again
        # a hostile or damaged file must not hand a training loop a class it does not have
        classes = labels[:, 0] if labels.ndim > 1 else labels
        if not self.info.labelled:
            check_unlabelled(split.path("labels"), classes)
        else:
            check_classes(split.path("labels"), classes, self.info.num_classes)
        # labels are small (60,000 are 480 KB): their sha256 on every open, as tar shards check theirs
        meta = self.info.arrays["labels"]
        if hashlib.sha256(read_whole(files["labels"], meta.size, split.path("labels"))).hexdigest() \
                != meta.sha256:
            raise FastMNISTError(f"{split.path('labels')}: sha256 differs from the manifest: the labels were "
                                 f"changed or replaced (the set must be converted again)")
        return images, torch.from_numpy(labels)

    def _decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        split, files = self.split, self._opened()
        parts = [decode_shard(read_whole(files[s.file], s.size, split.path(s.file)), s.first, s.count,
                              str(split.path(s.file)), self.info.num_classes, s.labels_sha256)
                 for s in split.shards]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        if self.stored == "float32":  # tar shards hold uint8 images: normalise them once
            images = normalize_u8(images, split.mean, split.std)
        return images, labels

    def __getstate__(self):
        # spawned workers open and map the files themselves (forked ones inherit them)
        return {**self.__dict__, "_tensors": None, "_files": None}


class StreamSource:
    """Tar shards at ``urls``, streamed: an epoch visits the shards in a shuffled order and
    each shard's samples shuffled within it, so a reader needs one shard at a time; ranks
    and workers take consecutive runs of it, so each fetches only the shards its run
    covers. Images are gathered as float32 normalised with ``mean_std``, or as uint8 when
    it is None. A rank's DataLoader workers hand shards to each other through a private
    directory, removed with this object."""

    consecutive = True
    random_access = False
    order_name = "shards"
    format = "wds"
    label_shape = ()  # tar shards hold one class per sample

    def __init__(self, info: SplitInfo, urls: list[str], prefetch: int, verify: bool,
                 mean_std: tuple[float, float] | None, retry: Retry, storage_options: dict | None):
        self.info, self.urls, self.prefetch, self.verify = info, urls, prefetch, verify
        self.mean_std, self.retry, self.storage_options = mean_std, retry, storage_options
        self.dtype = torch.uint8 if mean_std is None else torch.float32
        self.handoff = Path(tempfile.gettempdir()) / f"fastmnist-{uuid.uuid4().hex}"
        self._removal = weakref.finalize(self, _remove_dir, self.handoff, os.getpid())
        self._cache = None  # made on first use in each process
        self.closed = False

    def close(self) -> None:
        """Stop fetching, drop the shards held, remove the hand-off directory."""
        self.closed = True
        if self._cache is not None:
            self._cache.stopped.set()
            self._cache = None
        if self._removal is not None:  # None in a process that unpickled this source
            self._removal()

    @property
    def count(self) -> int:
        return self.info.count

    @property
    def cache(self) -> ShardCache:
        if self.closed:
            raise FastMNISTError(f"{self.urls[0]}: this loader was closed; make a new FastMNISTLoader")
        if self._cache is None:
            self._cache = ShardCache(list(self.info.shards), self.urls, self.prefetch, self.verify,
                                     self.mean_std, self.retry, self.storage_options, self.info.num_classes)
            weakref.finalize(self, self._cache.stopped.set)  # fetches still retrying give up
        return self._cache

    def order(self, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
        return shard_order([s.count for s in self.info.shards], seed, epoch, shuffle)

    def index_batches(self, epoch_pass):
        """The pass's batches of indices (int64 numpy), each yielded once its shards are
        loaded. Alone, the next epoch's first shards are fetched ahead near the end; when
        the rank's workers divide the share, nothing of the next epoch is, and in a pass
        they all start afresh each shard is fetched once by one of them (``ShardCache.handoff``)."""
        p = epoch_pass
        if p.parts is None:
            return self.cache.index_batches(p.share, p.numbers, p.batch_size, p.upcoming())
        handoff = self.cache.handoff(p.share, p.parts, p.part, self.handoff) if p.fresh else None
        return self.cache.index_batches(p.share, p.numbers, p.batch_size, None, handoff)

    def gather(self, idx: np.ndarray, x_out=None, y_out=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.gather(idx, x_out, y_out)

    def __getstate__(self):
        return {**self.__dict__, "_cache": None, "_removal": None}


def mixture_places(mix_with) -> list[tuple]:
    """``mix_with`` as (path, split) pairs: each entry a set's path (its train split) or a
    ``(path, split)`` pair."""
    if mix_with is None:
        return []
    if isinstance(mix_with, (str, os.PathLike, tuple)) or not mix_with:
        raise FastMNISTError(f"mix_with: expected a non-empty list of paths or (path, split) pairs, "
                             f"got {mix_with!r}")
    parts = []
    for part in mix_with:
        if isinstance(part, tuple) and len(part) == 2 and isinstance(part[1], str):
            parts.append(part)
        elif isinstance(part, (str, os.PathLike)):
            parts.append((part, "train"))
        else:
            raise FastMNISTError(f"mix_with: {part!r} is neither a set's path nor a (path, split) pair")
    return parts


def open_mixture(sources: list, places: list[tuple], normalize: bool, resident: bool) -> "MixedSource":
    """The parts of a mixture (``sources``, opened from ``places``: (path, split) pairs) as one
    source, once they agree on what a batch holds."""
    first = sources[0]
    if resident:
        raise FastMNISTError("resident=True with mix_with: a mixture gathers from each part where it is "
                             "mapped")
    for other, (path, split) in zip(sources, places, strict=True):
        name = f"mix_with: {path} ({split})"
        if not other.random_access:
            raise FastMNISTError(f"{name}: a mixture draws from anywhere in each part: local sets only")
        if (other.dtype, other.label_shape) != (first.dtype, first.label_shape):
            raise FastMNISTError(f"{name} holds {other.dtype} images with labels {other.label_shape}, the "
                                 f"first part {first.dtype} with {first.label_shape}")
        if normalize and (other.info.mean, other.info.std) != (first.info.mean, first.info.std):
            raise FastMNISTError(f"{name} is normalised with mean {other.info.mean} std {other.info.std}, "
                                 f"the first part with {first.info.mean} {first.info.std}: convert the parts "
                                 "with the same --mean and --std (or normalize=False)")
    return MixedSource(sources)


class MixedSource:
    """Local splits (``ArraySource``s of one image dtype) as one index space: part ``i``'s
    samples at indices ``offsets[i] ..``. Their images and labels are joined into one tensor
    each, in this process's memory, on first use (the parts' arrays together: 220 MB for
    MNIST's float32 train and test, a quarter with ``images="uint8"``), so a batch is one
    ``index_select`` as from one split. An epoch's order is the mixture selection's
    (``select.Mixture``), so ``order`` is the identity."""

    consecutive = False
    random_access = True
    order_name = "mixture"

    def __init__(self, parts: list):
        self.parts, first = parts, parts[0]
        self.info, self.format, self.dtype = first.info, first.format, first.dtype
        self.label_shape = first.label_shape
        self.sizes = [p.count for p in parts]
        self.count = sum(self.sizes)
        self._tensors = None  # joined on first use in each process

    @property
    def closed(self) -> bool:
        return any(p.closed for p in self.parts)

    def close(self) -> None:
        self._tensors = None
        for p in self.parts:
            p.close()

    def order(self, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
        return torch.arange(self.count)

    def index_batches(self, epoch_pass):
        share, size = epoch_pass.share, epoch_pass.batch_size
        return (share[b * size:(b + 1) * size] for b in epoch_pass.numbers)

    def gather(self, idx: torch.Tensor, x_out=None, y_out=None) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.tensors
        return torch.index_select(images, 0, idx, out=x_out), torch.index_select(labels, 0, idx, out=y_out)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts' images and labels, joined in part order."""
        if self._tensors is None:
            images, labels = zip(*(p.tensors for p in self.parts), strict=True)
            self._tensors = torch.cat(images), torch.cat(labels)
        return self._tensors

    def __getstate__(self):
        return {**self.__dict__, "_tensors": None}


def empty_batch(dtype: torch.dtype, n: int, pin: bool, label_shape: tuple[int, ...] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised host tensors for ``n`` samples: images ``(n, 1, 28, 28)`` of ``dtype``
    and int64 labels ``(n, *label_shape)``, pinned if ``pin``."""
    return (torch.empty((n, *IMAGE_SHAPE), dtype=dtype, pin_memory=pin),
            torch.empty((n, *label_shape), dtype=torch.int64, pin_memory=pin))


def _check_normalised(split: Split, images_f32: torch.Tensor, images_u8: np.ndarray) -> None:
    """Refuse a set whose float32 images are not its uint8 images normalised with the
    manifest's mean and std: every sample compared, ``CHECK_ROWS`` at a time (about 51 ms
    for 60,000 on 2 cores; see docs/benchmarks.md)."""
    for start in range(0, split.count, CHECK_ROWS):
        expected = normalize_u8(torch.from_numpy(np.array(images_u8[start:start + CHECK_ROWS])), split.mean,
                                split.std)
        found = images_f32[start:start + CHECK_ROWS]
        if not torch.equal(found, expected):
            k = start + int((found != expected).flatten(1).any(1).nonzero()[0, 0])
            raise FastMNISTError(f"{split.path('images_f32')}: sample {k} is not the uint8 image normalised "
                                 f"with the manifest's mean {split.mean} and std {split.std}: the manifest "
                                 "or the array was changed")


def _version(f) -> tuple[int, int]:
    """Which file ``f`` is: its device and inode."""
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino


def read_whole(f, size: int, shown) -> np.ndarray:
    """uint8 ``(size,)``: the open file ``f`` from its start, which must hold exactly ``size``
    bytes (``shown`` names it in errors)."""
    buf = np.empty(size, np.uint8)
    got = 0
    while got < size and (n := os.preadv(f.fileno(), [memoryview(buf)[got:]], got)):
        got += n
    if got < size or os.pread(f.fileno(), 1, size):
        raise FastMNISTError(f"{shown}: size changed: the manifest says {size} bytes")
    return buf


def _close_files(files: dict) -> None:
    for f in files.values():
        f.close()


def _remove_dir(path: Path, owner: int) -> None:
    """Remove ``path`` if this is process ``owner`` (not a forked copy of it)."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)
