"""Throughput of FastMNISTLoader against the usual pipelines, over one full epoch per round.

Each pipeline is a factory ``(batch_size) -> iterable of (x, y)``: one shuffled epoch of float32
``[B,1,28,28]`` images and int64 ``[B]`` labels; :func:`measure` times it. Used by
``fastmnist bench`` (the report) and by ``benchmarks/`` (pytest-benchmark).
"""

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .loader import FastMNISTLoader
from .store import open_shards

SEED = "seed pipeline, workers=0"  # the reference every ratio is taken against
FLOOR = "index_select floor"


def pipelines(raw_root: Path, shards: Path, cuda: bool | None = None
              ) -> dict[str, Callable[[int], Iterable]]:
    """Name -> ``factory(batch_size)`` of one epoch over the train split of ``shards``
    (converted from the raw files under ``raw_root``)."""
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision import transforms

    split = open_shards(shards).split("train")
    mean, std = split.mean, split.std
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    ram_x = torch.from_numpy(split.array("images_f32", mode="c")).clone()  # in-RAM copies
    ram_y = torch.from_numpy(split.array("labels", mode="c")).clone()

    def seed(workers, bs, pin=False):
        return DataLoader(torchvision.datasets.MNIST(str(raw_root), train=True, transform=tf),
                          batch_size=bs, shuffle=True, num_workers=workers, pin_memory=pin)

    def floor(bs):
        order = torch.randperm(len(ram_y))
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            yield ram_x.index_select(0, idx), ram_y.index_select(0, idx)

    found = {
        SEED: lambda bs: seed(0, bs),
        "seed pipeline, workers=2": lambda bs: seed(2, bs),
        "TensorDataset + DataLoader": lambda bs: DataLoader(TensorDataset(ram_x, ram_y),
                                                            batch_size=bs, shuffle=True),
        FLOOR: floor,
        "fastmnist float32": lambda bs: FastMNISTLoader(shards, batch_size=bs),
        "fastmnist uint8": lambda bs: FastMNISTLoader(shards, batch_size=bs, source="uint8"),
    }
    if torch.cuda.is_available() if cuda is None else cuda:
        found["fastmnist cuda pinned"] = lambda bs: _synced(FastMNISTLoader(
            shards, batch_size=bs, device="cuda"))
        found["fastmnist cuda resident"] = lambda bs: _synced(FastMNISTLoader(
            shards, batch_size=bs, device="cuda", resident=True))
        found["seed pipeline to cuda, workers=2"] = lambda bs: _synced(
            (x.cuda(non_blocking=True), y.cuda(non_blocking=True)) for x, y in seed(2, bs, pin=True))
    return found


def _synced(batches):
    """Yield from ``batches``, then wait for the GPU, so timings include the last copy."""
    yield from batches
    torch.cuda.synchronize()


def run_epoch(factory: Callable[[int], Iterable], batch_size: int) -> int:
    """Build the pipeline, consume one epoch, return the number of samples seen."""
    return sum(len(y) for _, y in factory(batch_size))


def measure(factory: Callable[[int], Iterable], batch_size: int, rounds: int) -> dict:
    """Median samples/s over ``rounds`` full epochs (after one warm-up to first batch), the
    time from construction to the first batch, and the peak extra resident memory."""
    start = time.perf_counter()
    first_iter = iter(factory(batch_size))
    next(first_iter)
    first_batch_s = time.perf_counter() - start
    del first_iter
    seconds, samples = [], 0
    with _PeakRSS() as rss:
        for _ in range(rounds):
            t = time.perf_counter()
            samples = run_epoch(factory, batch_size)
            seconds.append(time.perf_counter() - t)
    median = statistics.median(seconds)
    return {"samples": samples, "rounds": rounds, "seconds": seconds, "median_s": median,
            "samples_per_s": samples / median, "first_batch_ms": first_batch_s * 1e3,
            "peak_extra_mb": rss.peak_extra / 1e6}


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples this process's RSS every 5 ms in a thread; ``peak_extra`` above the start."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.peak_extra = self.peak - self.base
