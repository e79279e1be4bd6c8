"""Group tensors reused once nothing made from them is alive.

A loader on the CPU gathers about a thousand samples per call into a new tensor of a few
megabytes, then yields slices of it. Fresh memory of that size costs page faults: glibc
returns such blocks to the kernel and the next one is faulted in again (measured here: about
780 faults for two of every three 1024-sample groups, 1,000-7,000 an epoch). A
:class:`BufferPool` hands out the same few blocks instead, each only while no tensor that
shares its memory exists, so a batch a user keeps never changes.

How it knows: each block is handed out as ``torch.from_numpy(view)`` of a fresh numpy view
of it, and torch keeps that view object alive for exactly as long as any tensor sharing
the storage exists (a slice, a ``.numpy()`` view, the storage itself). The pool holds only
a weak reference to the view: once it is dead, nothing uses the block. Object lifetime is
a language guarantee, unlike reference counts, which CPython versions and the free-threaded
build count differently.
"""

import threading
import weakref

import numpy as np
import torch

KEEP = 4  # blocks a pool holds: the group being yielded, the one gathered next, and slack


def _never_handed_out():
    return None


class BufferPool:
    """Up to ``keep`` reusable arrays of ``rows`` samples of ``sample_shape`` and ``dtype``.
    When all are in use, a new one takes the place of the one pooled longest ago, so blocks
    a user holds on to leave the pool instead of filling it. Safe to share between threads."""

    def __init__(self, rows: int, sample_shape: tuple[int, ...], dtype: torch.dtype, keep: int = KEEP):
        self.rows, self.sample_shape, self.keep = rows, tuple(sample_shape), keep
        self.dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._blocks: list[np.ndarray] = []
        self._handed: list = []  # per block: a weak reference to the view handed out last
        self._oldest = 0
        self._lock = threading.Lock()  # the check and the handing out: one step for threads

    def take(self, n: int) -> torch.Tensor:
        """An uninitialised tensor ``(n, *sample_shape)``, ``n <= rows``, whose memory no live
        tensor shares (a pooled block if one is unused, else a new one)."""
        with self._lock:
            for i, handed in enumerate(self._handed):
                if handed() is None:
                    return self._hand_out(i, n)
            block = np.empty((self.rows, *self.sample_shape), self.dtype)
            if len(self._blocks) < self.keep:
                self._blocks.append(block)
                self._handed.append(_never_handed_out)
                return self._hand_out(len(self._blocks) - 1, n)
            i, self._oldest = self._oldest, (self._oldest + 1) % self.keep
            self._blocks[i] = block
            return self._hand_out(i, n)

    def _hand_out(self, i: int, n: int) -> torch.Tensor:
        view = self._blocks[i][:n]
        self._handed[i] = weakref.ref(view)
        return torch.from_numpy(view)
