"""The fused augmentation kernel (numba) against the torch path, the un-augmented loader and
the bare reference they share a bottleneck with (its batches with every pixel gathered),
interleaved in one run, batch 64 on the CPU: medians of rounds (samples/s) with their
spread, after a warm-up epoch of each; where a 1,024-sample group's time goes; the first
batch's latency with the JIT cache cold and warm (fresh interpreters).

    pytest benchmarks/test_augment_speed.py --benchmark-only -s
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchvision import transforms

from fastmnist import FastMNISTLoader, open_shards
from fastmnist.loading import kernels

ROUNDS = 15
BATCH = 64
STEPS = {"RandomAffine (recipe)": transforms.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
         "RandomAffine (recipe), bilinear": transforms.RandomAffine(
             10, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=transforms.InterpolationMode.BILINEAR),
         "RandomRotation(30)": transforms.RandomRotation(30),
         "RandomCrop(28, padding=4)": transforms.RandomCrop(28, padding=4),
         "RandomPerspective()": transforms.RandomPerspective(),
         "ElasticTransform()": transforms.ElasticTransform()}


def _rate(loader) -> float:
    start, n = time.perf_counter(), 0
    for _, y in loader:
        n += len(y)
    return n / (time.perf_counter() - start)


class _PixelGather:
    """The bare reference a nearest resampling shares its bottleneck with: ``loader``'s
    batches, each sample's 784 pixels then gathered through one fixed pixel order
    (``index_select``): the per-pixel gather without the per-sample grid."""

    def __init__(self, loader):
        self.loader, self.order = loader, torch.randperm(28 * 28, generator=torch.Generator().manual_seed(0))

    def __iter__(self):
        for x, y in self.loader:
            yield x.flatten(1).index_select(1, self.order).view_as(x), y


def _loader(shards, step, jit: bool):
    info = open_shards(shards).split("train").info
    os.environ["FASTMNIST_JIT"] = "1" if jit else "0"
    kernels.available.cache_clear()
    try:
        transform = transforms.Compose([step, transforms.ToTensor(),
                                        transforms.Normalize((info.mean,), (info.std,))])
        loader = FastMNISTLoader(shards, batch_size=BATCH, transform=transform)
    finally:
        del os.environ["FASTMNIST_JIT"]
        kernels.available.cache_clear()
    assert (loader._delivery.finish.fused is not None) == jit
    return loader


def test_fused_kernel_against_the_torch_path(benchmark, bench_data):
    pytest.importorskip("numba")
    shards = bench_data[1]
    plain = FastMNISTLoader(shards, batch_size=BATCH)
    loaders = {"plain (float32)": plain, "plain + bare pixel gather": _PixelGather(plain)}
    for name, step in STEPS.items():
        loaders[f"{name}, fused kernel"] = _loader(shards, step, True)
        loaders[f"{name}, torch path"] = _loader(shards, step, False)
    rates = {name: [] for name in loaders}
    for loader in loaders.values():  # a warm-up epoch each, not counted: mapping the set, compiling
        _rate(loader)

    def rounds():
        for _ in range(ROUNDS):
            for name, loader in loaders.items():
                rates[name].append(_rate(loader))

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    plain = statistics.median(rates["plain (float32)"])
    for name, values in rates.items():
        median = statistics.median(values)
        benchmark.extra_info[name] = {"samples_per_s": round(median), "spread": [round(min(values)),
                                      round(max(values))], "of_plain": round(median / plain, 3)}
        print(f"{name:>36}: {median:>10,.0f} samples/s (min {min(values):,.0f}, max {max(values):,.0f}), "
              f"{median / plain:.3f} of plain")
    bare = statistics.median(rates["plain + bare pixel gather"])
    for name in STEPS:
        of_bare = statistics.median(rates[f"{name}, fused kernel"]) / bare
        benchmark.extra_info[f"{name}, fused kernel"]["of_bare_pixel_gather"] = round(of_bare, 3)
        print(f"{name}, fused kernel: {of_bare:.3f} of plain + bare pixel gather")
    _time_split(loaders["RandomAffine (recipe), fused kernel"], loaders["RandomAffine (recipe), torch path"],
                benchmark.extra_info)


def _time_split(fused, torch_path, info: dict) -> None:
    """us per sample of a 1,024-sample group (medians of 20): the fused kernel (draws, grid,
    gather and normalisation in one call), and the torch path's parts: the parameter draws,
    the resampling, the normalisation."""
    augment, x = fused._augment, fused.source.gather(torch.arange(1024))[0].clone()
    norm, normalise = fused._delivery.finish.fused, torch_path._delivery.finish.to_float
    params = augment.params(0, torch.arange(1024))
    resampled = augment.images(x, params)
    out = torch.empty(x.shape)
    parts = {"fused kernel": lambda: augment.images_normalised(x, 0, torch.arange(1024), norm, out),
             "torch path: params": lambda: augment.params(0, torch.arange(1024)),
             "torch path: resample": lambda: augment.images(x, params),
             "torch path: normalise": lambda: normalise(resampled)}
    for name, run in parts.items():
        times = []
        for _ in range(20):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) / 1024 * 1e6)
        info[f"us per sample: {name}"] = round(statistics.median(times), 3)
        print(f"{name:>36}: {statistics.median(times):.3f} us per sample")


FIRST_BATCH = """
import sys, time
start = time.perf_counter()
from torchvision import transforms
from fastmnist import FastMNISTLoader, open_shards
info = open_shards(sys.argv[1]).split("train").info
loader = FastMNISTLoader(sys.argv[1], batch_size=64, transform=transforms.Compose([
    transforms.RandomAffine(10), transforms.ToTensor(), transforms.Normalize((info.mean,), (info.std,))]))
made = time.perf_counter()
next(iter(loader))
print(made - start, time.perf_counter() - made)
"""


def test_first_batch_with_the_jit_cache_cold_and_warm(benchmark, bench_data, tmp_path):
    pytest.importorskip("numba")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}  # starts empty: cold

    def first_batch() -> float:
        done = subprocess.run([sys.executable, "-c", FIRST_BATCH, str(bench_data[1])], capture_output=True,
                              text=True, env=env, cwd=Path(__file__).parents[1], check=True)
        return float(done.stdout.split()[1])

    cold = first_batch()
    warm = [first_batch() for _ in range(3)]
    benchmark.pedantic(lambda: None, rounds=1)
    benchmark.extra_info.update(first_batch_cold_s=round(cold, 3),
                                first_batch_warm_s=round(statistics.median(warm), 3))
    print(f"first batch: cold JIT cache {cold:.2f} s, warm {statistics.median(warm):.3f} s (median of 3)")
