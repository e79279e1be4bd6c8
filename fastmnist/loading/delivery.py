"""Delivery: how the batches of a :class:`~.plan.Pass` reach the training loop, one class
per mode, chosen once when the loader is built (as ``torch.utils.data.dataloader`` has one
iterator class per mode):

- :class:`Grouped`: on the CPU from a source with random access, about ``GROUP_SAMPLES``
  samples gathered per call into reused blocks, each batch a slice (at small batch sizes
  the cost is per call, not per byte);
- :class:`PerBatch`: one gather per batch: streamed shards, pinned host batches, and sets
  resident on a device;
- :class:`CudaPrefetch`: pinned host batches copied to the GPU on a side stream, ahead of
  use.

Each yields ``(x, y)``: images ``[B, 1, 28, 28]`` (float32 normalised, or uint8 with
``normalize=False``) and int64 labels ``[B, *label_shape]``; what is gathered is finished by
a :class:`Finish` (augmented, normalised).
"""

import functools

import torch
from torch.utils.data import get_worker_info

from ..formats.manifest import IMAGE_SHAPE
from ..formats.normalize import Normalizer
from . import kernels
from .buffers import BufferPool
from .device import prefetch_to_cuda
from .sources import empty_batch

GROUP_SAMPLES = 1024  # on the CPU, samples gathered per call (each batch is then a slice)


def choose(source, device: torch.device, normalize: bool, resident: bool, pin: bool, prefetch: int,
           augment=None):
    """The delivery for ``source`` and the ``FastMNISTLoader`` arguments of the same names
    (``pin``: pin host batches; ``augment``: an ``augment.Augment`` or None)."""
    to_float = None  # uint8 -> float32 normalised, where the source gathers uint8
    if normalize and source.dtype == torch.uint8:
        reciprocal = augment is not None and augment.reciprocal  # as the user's transform scales
        to_float = Normalizer(source.info.mean, source.info.std, device, reciprocal)
    fused = None  # the normalisation for augment's kernel, where it normalises too
    if to_float is not None and augment is not None and augment.fusable(device):
        fused = kernels.norm(source.info.mean, source.info.std, augment.reciprocal)
    finish = Finish(to_float, augment, fused)
    if device.type == "cuda" and not resident:
        return CudaPrefetch(source, finish, device, prefetch)
    if source.random_access and device.type == "cpu" and not pin:
        return Grouped(source, finish)
    return PerBatch(source, finish, pin)


class Finish:
    """Gathered images -> what the loop gets: uint8 augmented by ``augment``'s geometric
    steps, normalised by ``to_float`` (into ``out`` when given), then its erasing steps;
    each part skipped where it is None. With ``fused`` (``kernels.norm``)
    the geometric step and the normalisation run as one kernel."""

    def __init__(self, to_float, augment, fused=None):
        self.to_float, self.augment, self.fused = to_float, augment, fused

    @property
    def makes_float(self) -> bool:
        return self.to_float is not None

    def __call__(self, x: torch.Tensor, idx, epoch: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused is not None:
            out = torch.empty(x.shape, dtype=torch.float32) if out is None else out
            return self.augment.images_normalised(x, epoch, idx, self.fused, out)
        params = None if self.augment is None else self.augment.params(epoch, idx)
        if params is not None:
            x = self.augment.images(x, params)
        if self.to_float is not None:
            x = self.to_float(x) if out is None else self.to_float(x, out=out)
        if params is not None:
            x = self.augment.normalised(x, params)
        return x

    def from_source(self, images: torch.Tensor, idx, epoch: int, out: torch.Tensor) -> torch.Tensor:
        """The samples ``idx`` finished by the fused kernel (``fused`` set) straight from
        ``images``, the source's whole uint8 ``(N, 1, 28, 28)``: no gather before it."""
        return self.augment.images_normalised(images, epoch, idx, self.fused, out, whole=True)


class Grouped:
    """Batches sliced from groups of about ``GROUP_SAMPLES`` samples, gathered (and
    finished) into blocks of a :class:`BufferPool` per dtype, kept across epochs in each
    process: a block is written again only once no batch of it is alive."""

    def __init__(self, source, finish: Finish):
        self.source, self.finish = source, finish
        self._pools = None  # made on first use in each process

    def batches(self, epoch_pass):
        src, size, share, numbers = self.source, epoch_pass.batch_size, epoch_pass.share, epoch_pass.numbers
        pools = self._pools_for(size)
        group = max(1, GROUP_SAMPLES // size)
        for start in range(0, len(numbers), group):
            part = numbers[start:start + group]
            if part.step == 1:
                idx = share[part[0] * size:(part[-1] + 1) * size]
            else:  # a DataLoader worker's batches: every k-th
                idx = torch.cat([share[b * size:(b + 1) * size] for b in part])
            if self.finish.fused is not None:  # the kernel reads the samples where they lie
                images, labels = src.tensors
                out = pools[torch.float32].take(len(idx))
                x = self.finish.from_source(images, idx, epoch_pass.epoch, out)
                y = torch.index_select(labels, 0, idx)
            else:
                x, y = src.gather(idx, pools[src.dtype].take(len(idx)))
                out = pools[torch.float32].take(len(idx)) if self.finish.makes_float else None
                x = self.finish(x, idx, epoch_pass.epoch, out)
            yield from zip(x.split(size), y.split(size), strict=True)

    def _pools_for(self, batch_size: int) -> dict[torch.dtype, BufferPool]:
        if self._pools is None:
            rows = batch_size * max(1, GROUP_SAMPLES // batch_size)
            self._pools = {d: BufferPool(rows, IMAGE_SHAPE, d) for d in {self.source.dtype, torch.float32}}
        return self._pools

    def __getstate__(self):
        return {**self.__dict__, "_pools": None}


class PerBatch:
    """One gather per batch, into new (pinned, if ``pin`` and not in a DataLoader worker)
    tensors, then finished (a new tensor, pinned in its turn)."""

    def __init__(self, source, finish: Finish, pin: bool):
        self.source, self.finish, self.pin = source, finish, pin

    def batches(self, epoch_pass):
        src, pin = self.source, self.pin and get_worker_info() is None  # a worker's batches are copied anyway
        changes = self.finish.makes_float or self.finish.augment is not None
        for idx in src.index_batches(epoch_pass):
            out = empty_batch(src.dtype, len(idx), True, src.label_shape) if pin else ()
            x, y = src.gather(idx, *out)
            x = self.finish(x, idx, epoch_pass.epoch)
            yield (x.pin_memory() if pin and changes else x), y


class CudaPrefetch:
    """Batches on ``device``: gathered into reused pinned host buffers, copied (then
    augmented and normalised on the GPU) on a side stream ``prefetch`` batches ahead
    (``device.py``)."""

    def __init__(self, source, finish: Finish, device: torch.device, prefetch: int):
        self.source, self.finish, self.device, self.prefetch = source, finish, device, prefetch

    def batches(self, epoch_pass):
        src = self.source
        finish = functools.partial(self.finish, epoch=epoch_pass.epoch)
        return prefetch_to_cuda(src.index_batches(epoch_pass), src.gather, src.dtype, epoch_pass.batch_size,
                                self.device, self.prefetch, finish, src.label_shape)
