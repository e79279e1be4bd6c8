"""The GPU benchmark rows (run by tools/gpu_check.sh on a machine with CUDA): samples/s of
the resident loader at batch 256, of the prefetching loader against the host-to-device copy
bandwidth it is bound by (pinned uint8 batches copied alone), and of nearest RandomAffine on
the device; medians of 5 epochs (min-max), the GPU synchronised before each clock reading.
Prints a markdown table for docs/benchmarks.md.

    python tools/gpu_bench.py SET
"""

import statistics
import sys
import time

import torch
from torchvision import transforms

from fastmnist import FastMNISTLoader, open_shards

ROUNDS = 5


def _rate(run) -> tuple[float, float, float]:
    rates = []
    for _ in range(ROUNDS + 1):  # the first warms up
        torch.cuda.synchronize()
        start = time.perf_counter()
        n = run()
        torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - start))
    rates = rates[1:]
    return statistics.median(rates), min(rates), max(rates)


def _epoch(loader) -> int:
    n = 0
    for _, y in loader:
        n += len(y)
    return n


def _copy_only(count: int, batch: int) -> int:
    """Pinned uint8 batches copied to the GPU one after another, nothing else: the bound."""
    host = torch.empty((batch, 1, 28, 28), dtype=torch.uint8).pin_memory()
    for _ in range(count // batch):
        host.to("cuda", non_blocking=True)
    return count // batch * batch


def main(path: str) -> None:
    info = open_shards(path).split("train").info
    affine = transforms.Compose([transforms.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                                 transforms.ToTensor(), transforms.Normalize((info.mean,), (info.std,))])
    rows = {
        "resident, float32, batch 256": FastMNISTLoader(path, batch_size=256, device="cuda", resident=True,
                                                        images="float32"),
        "resident, uint8, batch 256": FastMNISTLoader(path, batch_size=256, device="cuda", resident=True),
        "prefetch, uint8, batch 256": FastMNISTLoader(path, batch_size=256, device="cuda"),
        "resident + RandomAffine (nearest), batch 256": FastMNISTLoader(path, batch_size=256, device="cuda",
                                                                         resident=True, transform=affine),
    }
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {info.count} samples\n")
    print("| loader | samples/s (min-max) |\n|---|---|")
    for name, loader in rows.items():
        median, low, high = _rate(lambda loader=loader: _epoch(loader))
        print(f"| {name} | {median:,.0f} ({low:,.0f}-{high:,.0f}) |")
    median, low, high = _rate(lambda: _copy_only(info.count, 256))
    print(f"| bound: pinned uint8 batches of 256 copied alone | {median:,.0f} ({low:,.0f}-{high:,.0f}) |")


if __name__ == "__main__":
    main(sys.argv[1])
