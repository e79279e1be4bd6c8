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
``normalize=False``) and int64 labels ``[B, *label_shape]``.
"""

import torch

from ..formats.manifest import IMAGE_SHAPE
from ..formats.normalize import normalizer
from .buffers import BufferPool
from .device import prefetch_to_cuda
from .sources import empty_batch

GROUP_SAMPLES = 1024  # on the CPU, samples gathered per call (each batch is then a slice)


def choose(source, device: torch.device, normalize: bool, resident: bool, pin: bool, prefetch: int):
    """The delivery for ``source`` and the ``FastMNISTLoader`` arguments of the same names
    (``pin``: pin host batches)."""
    to_float = None  # uint8 -> float32 normalised, where the source gathers uint8
    if normalize and source.dtype == torch.uint8:
        to_float = normalizer(source.info.mean, source.info.std, device)
    if device.type == "cuda" and not resident:
        return CudaPrefetch(source, to_float, device, prefetch)
    if source.random_access and device.type == "cpu" and not pin:
        return Grouped(source, to_float)
    return PerBatch(source, to_float, pin)


class Grouped:
    """Batches sliced from groups of about ``GROUP_SAMPLES`` samples, gathered (and
    normalised) into blocks of a :class:`BufferPool` per dtype, kept across epochs in each
    process: a block is written again only once no batch of it is alive."""

    def __init__(self, source, to_float):
        self.source, self.to_float = source, to_float
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
            x, y = src.gather(idx, pools[src.dtype].take(len(idx)))
            if self.to_float is not None:
                x = self.to_float(x, out=pools[torch.float32].take(len(idx)))
            yield from zip(x.split(size), y.split(size), strict=True)

    def _pools_for(self, batch_size: int) -> dict[torch.dtype, BufferPool]:
        if self._pools is None:
            rows = batch_size * max(1, GROUP_SAMPLES // batch_size)
            self._pools = {d: BufferPool(rows, IMAGE_SHAPE, d) for d in {self.source.dtype, torch.float32}}
        return self._pools

    def __getstate__(self):
        return {**self.__dict__, "_pools": None}


class PerBatch:
    """One gather per batch, into new (pinned, if ``pin``) tensors; uint8 normalised by
    ``to_float`` unless it is None (the normalised tensor pinned in its turn)."""

    def __init__(self, source, to_float, pin: bool):
        self.source, self.to_float, self.pin = source, to_float, pin

    def batches(self, epoch_pass):
        src = self.source
        for idx in src.index_batches(epoch_pass):
            out = empty_batch(src.dtype, len(idx), True, src.label_shape) if self.pin else ()
            x, y = src.gather(idx, *out)
            if self.to_float is not None:
                x = self.to_float(x).pin_memory() if self.pin else self.to_float(x)
            yield x, y


class CudaPrefetch:
    """Batches on ``device``: gathered into reused pinned host buffers, copied (and
    normalised on the GPU) on a side stream ``prefetch`` batches ahead (``device.py``)."""

    def __init__(self, source, to_float, device: torch.device, prefetch: int):
        self.source, self.to_float, self.device, self.prefetch = source, to_float, device, prefetch

    def batches(self, epoch_pass):
        src = self.source
        return prefetch_to_cuda(src.index_batches(epoch_pass), src.gather, src.dtype, epoch_pass.batch_size,
                                self.device, self.prefetch, self.to_float or (lambda x: x), src.label_shape)
