"""Where a loader's batches come from, behind one small interface.

A source knows its sample ``count``, the ``dtype`` of the images it gathers, the visiting
``order`` of an epoch (and whether ranks split it in consecutive ``blocks``), how to group
a rank's order into batches of indices (fetching ahead what they will need), and how to
``gather`` a batch. The loader owns everything else: epochs, resume, the rank and worker
split, and delivery to the device.

- :class:`ArraySource`: the whole split as tensors (memory-mapped ``.npy`` arrays, or local
  tar shards decoded once; optionally resident on a device), gathered with ``index_select``.
- :class:`StreamSource`: tar shards streamed from URLs through a :class:`ShardCache`.
"""

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .cache import ShardCache
from .idx import check_classes
from .manifest import IMAGE_SHAPE, SplitInfo
from .normalize import normalize_u8
from .order import epoch_order, shard_order
from .store import Split
from .tar import decode_shard
from .transport import Retry, fetch


class ArraySource:
    """Images ``(N, 1, 28, 28)`` (float32 or uint8) and int64 labels ``(N, *label_shape)``,
    as tensors on one device; an epoch visits them in a permutation of ``0..N-1``."""

    blocks = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    @property
    def count(self) -> int:
        return len(self.labels)

    @property
    def dtype(self) -> torch.dtype:
        return self.images.dtype

    @property
    def label_shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape[1:])

    def order(self, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
        return epoch_order(self.count, seed, epoch, shuffle)

    def index_batches(self, order: torch.Tensor, numbers: Iterable[int], batch_size: int,
                      upcoming: Callable[[], torch.Tensor], division=None) -> Iterator[torch.Tensor]:
        """``order[b * batch_size:(b + 1) * batch_size]`` for each ``b`` of ``numbers``
        (``division`` is for sources that fetch: this one has everything at hand)."""
        order = order.to(self.images.device)
        return (order[b * batch_size:(b + 1) * batch_size] for b in numbers)

    def gather(self, idx: torch.Tensor, x_out=None, y_out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of the samples ``idx``, into ``x_out``/``y_out`` when given."""
        return (torch.index_select(self.images, 0, idx, out=x_out),
                torch.index_select(self.labels, 0, idx, out=y_out))


def local_arrays(split: Split, format: str, dtype: str, device: torch.device | None) -> ArraySource:
    """The split at ``split.root`` as an :class:`ArraySource` of ``dtype`` ("float32",
    pre-normalised, or "uint8") images: mapped from the ``.npy`` arrays ("npy") or decoded
    once from the local tar shards ("wds"); copied onto ``device`` unless it is None."""
    if format == "npy":
        # copy-on-write mappings: writable for torch, and never written back
        images = torch.from_numpy(split.array("images_f32" if dtype == "float32" else "images_u8", mode="c"))
        mapped = split.array("labels", mode="c")
        # a hostile or damaged file must not hand a training loop a class it does not have
        check_classes(split.path("labels"), mapped[:, 0] if mapped.ndim > 1 else mapped,
                      split.info.num_classes)
        labels = torch.from_numpy(mapped)
    else:
        paths = [str(split.path(s.file)) for s in split.shards]
        parts = [decode_shard(fetch(path, s.size), s.first, s.count, path, split.info.num_classes)
                 for path, s in zip(paths, split.shards, strict=True)]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        if dtype == "float32":  # tar shards hold uint8 images: normalise them once
            images = normalize_u8(images, split.mean, split.std)
    if device is not None:
        images, labels = images.to(device, copy=True), labels.to(device, copy=True)
    return ArraySource(images, labels)


class StreamSource:
    """Tar shards at ``urls``, streamed: an epoch visits the shards in a shuffled order and
    each shard's samples shuffled within it, so a reader needs one shard at a time; ranks
    take consecutive runs of it (``blocks``), so each fetches only the shards its run
    covers. Images are gathered as float32 normalised with ``normalize`` = ``(mean, std)``,
    or as uint8 when it is None."""

    blocks = True
    label_shape = ()  # tar shards hold one class per sample

    def __init__(self, info: SplitInfo, urls: list[str], prefetch: int, verify: bool,
                 normalize: tuple[float, float] | None, retry: Retry, storage_options: dict | None):
        self.info = info
        self.dtype = torch.uint8 if normalize is None else torch.float32
        self.cache = ShardCache(list(info.shards), urls, prefetch, verify, normalize, retry, storage_options,
                                info.num_classes)

    @property
    def count(self) -> int:
        return self.info.count

    def order(self, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
        return shard_order([s.count for s in self.info.shards], seed, epoch, shuffle)

    def index_batches(self, order: torch.Tensor, numbers: Iterable[int], batch_size: int,
                      upcoming: Callable[[], torch.Tensor], division=None) -> Iterator[np.ndarray]:
        """As :meth:`ArraySource.index_batches`, each batch yielded once its shards are
        loaded; ``upcoming()``, the next epoch's order, tells which shards to fetch ahead
        near the end. ``division``: ``(parts, me, where)`` when the rank's DataLoader workers
        divide ``order`` into ``parts``: then nothing of the next epoch is fetched ahead, and
        unless ``where`` is None every shard is fetched once by one of the workers (see
        ``ShardCache.handoff``)."""
        if division is None:
            return self.cache.index_batches(order, numbers, batch_size, upcoming())
        parts, me, where = division
        handoff = self.cache.handoff(order, parts, me, where) if where is not None else None
        return self.cache.index_batches(order, numbers, batch_size, None, handoff)

    def gather(self, idx: np.ndarray, x_out=None, y_out=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.gather(idx, x_out, y_out)


def empty_batch(dtype: torch.dtype, n: int, pin: bool, label_shape: tuple[int, ...] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised host tensors for ``n`` samples: images ``(n, 1, 28, 28)`` of ``dtype``
    and int64 labels ``(n, *label_shape)``, pinned if ``pin``."""
    return (torch.empty((n, *IMAGE_SHAPE), dtype=dtype, pin_memory=pin),
            torch.empty((n, *label_shape), dtype=torch.int64, pin_memory=pin))
