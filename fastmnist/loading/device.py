"""Host-to-GPU transfer: pinned, reused host buffers copied on a side stream, ahead of use."""

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch

from .sources import empty_batch


def prefetch_to_cuda(
    index_batches: Iterable[torch.Tensor],
    gather: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
    dtype: torch.dtype,
    batch_size: int,
    device: torch.device,
    depth: int,
    finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    label_shape: tuple[int, ...] = (),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` on ``device`` for each batch of sample indices.

    ``gather(idx, x_out, y_out)`` fills pinned host tensors (images ``(len(idx), 1, 28, 28)``
    of ``dtype``, int64 labels ``(len(idx), *label_shape)``); the copy and ``finish(x, idx)``
    (augmentation and normalisation, run on the GPU) go on a side stream ``depth`` batches
    ahead of the consumer. Each of the ``depth + 1`` pinned slots is reused only once its
    previous copy has completed.
    """
    stream = torch.cuda.Stream(device)
    slots = []
    pending = deque()
    for i, idx in enumerate(index_batches):
        if len(slots) <= depth:
            slots.append((*empty_batch(dtype, batch_size, True, label_shape), torch.cuda.Event()))
        host_x, host_y, copied = slots[i % len(slots)]
        copied.synchronize()  # this slot's previous copy is done (returns at once if none)
        n = len(idx)
        gather(idx, host_x[:n], host_y[:n])
        with torch.cuda.stream(stream):
            x = finish(host_x[:n].to(device, non_blocking=True), idx)
            y = host_y[:n].to(device, non_blocking=True)
            copied.record(stream)
        pending.append((x, y, copied))
        if len(pending) > depth:
            yield _hand_over(*pending.popleft(), device)
    while pending:
        yield _hand_over(*pending.popleft(), device)


def _hand_over(x, y, ready, device):
    """Make the consumer's stream wait for the copy, and keep the memory alive for it."""
    current = torch.cuda.current_stream(device)
    current.wait_event(ready)
    x.record_stream(current)
    y.record_stream(current)
    return x, y
