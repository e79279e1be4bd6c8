"""Group tensors reused once nothing made from them is alive.

A loader on the CPU gathers about a thousand samples per call into a new tensor of a few
megabytes, then yields slices of it. Fresh memory of that size costs page faults: glibc
returns such blocks to the kernel and the next one is faulted in again (measured here: about
780 faults for two of every three 1024-sample groups, 1,000-7,000 an epoch). A
:class:`BufferPool` hands out the same few blocks instead, each only while no tensor that
shares its memory exists, so a batch a user keeps never changes.

A block is a numpy array wrapped by ``torch.from_numpy``, which keeps the array alive for as
long as any tensor sharing its storage (the group, or a batch sliced from it) is alive:
the array's reference count says when the last one is gone.
"""

import sys
import threading

import numpy as np
import torch

_UNUSED = 2  # references to a pooled array nothing uses: the pool's list, getrefcount's argument
KEEP = 4  # blocks a pool holds: the group being yielded, the one gathered next, and slack


class BufferPool:
    """Up to ``keep`` reusable arrays of ``rows`` samples of ``sample_shape`` and ``dtype``.
    When all are in use, a new one takes the place of the one pooled longest ago, so blocks
    a user holds on to leave the pool instead of filling it. Safe to share between threads."""

    def __init__(self, rows: int, sample_shape: tuple[int, ...], dtype: torch.dtype, keep: int = KEEP):
        self.rows, self.sample_shape, self.keep = rows, tuple(sample_shape), keep
        self.dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self._arrays: list[np.ndarray] = []
        self._oldest = 0
        self._lock = threading.Lock()  # the check and the wrapping: one step for threads

    def take(self, n: int) -> torch.Tensor:
        """An uninitialised tensor ``(n, *sample_shape)``, ``n <= rows``, whose memory no live
        tensor shares (a pooled block if one is unused, else a new one)."""
        with self._lock:
            for i in range(len(self._arrays)):
                if sys.getrefcount(self._arrays[i]) == _UNUSED:
                    return torch.from_numpy(self._arrays[i][:n])
            block = np.empty((self.rows, *self.sample_shape), self.dtype)
            if len(self._arrays) < self.keep:
                self._arrays.append(block)
            else:
                self._arrays[self._oldest] = block
                self._oldest = (self._oldest + 1) % self.keep
            return torch.from_numpy(block[:n])
