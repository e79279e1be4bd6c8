"""The cost curve as sets grow: generate, convert and read ``N`` generated train images.

For each N: seconds to write the raw files (``synth``) and to convert them (a fresh
process; its peak resident memory from ``VmHWM``); float32 is kept only while it fits in a
quarter of the machine's memory, else the set is uint8 only (``--no-float32``). Reading at
batch 256: samples/s over full epochs in the full random order with the set in the page
cache; then, with the set's pages evicted (``posix_fadvise(DONTNEED)``, as when it does not
fit), the first batch's latency and samples/s over the first ``COLD_BATCHES`` batches in
the full random order and in the locality order. Shuffle quality of both orders: how far
each batch's label mix is from the whole set's (mean total variation distance), on the
labels as stored and on the same labels sorted by class (the worst case for locality).
"""

import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..conversion.synth import write_raw
from ..loader import FastMNISTLoader
from ..loading.order import block_order, epoch_order
from .pipelines import measure
from .report import machine

SIZES = (60_000, 600_000, 6_000_000)
BATCH = 256
COLD_BATCHES = 400
LOCALITY = 4096  # samples per block of the locality order: 3.2 MB of uint8, 12.8 MB of float32

# Run in a fresh interpreter: VmHWM is the process's own peak (getrusage's ru_maxrss would
# include the forking parent's).
_MEASURED = """
import sys
from fastmnist.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))  # KiB
sys.exit(code)
"""


def run_measured(*args: str) -> tuple[float, float]:
    """Seconds and peak resident MiB of a fresh process running ``fastmnist ARGS``."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURED, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fastmnist {' '.join(args)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start, int(done.stdout.split()[-1]) / 1024


def evict(directory: Path) -> None:
    """Drop the pages of every file under ``directory`` from the page cache (pages still
    mapped stay: loaders that mapped them are collected first)."""
    gc.collect()
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def label_mixing(labels: np.ndarray, batch: int, num_classes: int) -> float:
    """Mean total variation distance between each full batch's label histogram and the
    whole sequence's, for ``labels`` (int ``(n,)``) in visiting order: 0 is a perfect mix."""
    n = len(labels) // batch
    rows = labels[:n * batch].reshape(n, batch).astype(np.int64)
    counts = np.bincount((rows + num_classes * np.arange(n)[:, None]).ravel(), minlength=n * num_classes)
    share = counts.reshape(n, num_classes) / batch
    whole = np.bincount(labels, minlength=num_classes) / len(labels)
    return float(0.5 * np.abs(share - whole).sum(1).mean())


def _cold(shards: Path, locality: int | None) -> dict:
    """With the set evicted from the page cache: the first batch's latency (construction
    included) and samples/s from construction through ``COLD_BATCHES`` batches (or the
    epoch, if shorter)."""
    evict(shards)
    start = time.perf_counter()
    it = iter(FastMNISTLoader(shards, batch_size=BATCH, locality=locality))
    samples = len(next(it)[1])
    first = time.perf_counter() - start
    samples += sum(len(y) for _, y in itertools.islice(it, COLD_BATCHES - 1))
    return {"first_batch_ms": first * 1e3, "samples_per_s": samples / (time.perf_counter() - start)}


def read_ahead_kb(path: Path) -> int | None:
    """The read-ahead of the block device holding ``path`` (a fault on a mapped file reads
    about this much around it), or None where it cannot be told."""
    try:
        device = os.stat(path).st_dev
        sys_dir = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
        queue = sys_dir / "queue" if (sys_dir / "queue").exists() else sys_dir / ".." / "queue"
        return int((queue / "read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None


def _quality(shards: Path, n: int) -> dict:
    """``label_mixing`` at batch 256 of the full random and the locality order (and of no
    shuffle), on the labels as stored and sorted by class."""
    stored = np.load(shards / "train_labels.npy")  # generated MNIST: 10 classes
    orders = {"random": epoch_order(n, 0, 0, True).numpy(),
              "locality": block_order(n, 0, 0, True, LOCALITY).numpy(), "unshuffled": np.arange(n)}
    return {f"{kind}_{name}": label_mixing(labels[order], BATCH, 10)
            for kind, labels in (("stored", stored), ("sorted", np.sort(stored)))
            for name, order in orders.items()}


def one_size(work: Path, n: int, rounds: int) -> dict:
    root, shards = work / f"raw-{n}", work / f"set-{n}"
    start = time.perf_counter()
    write_raw(root, n, 1000, compressed=False)
    synth_s = time.perf_counter() - start
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    float32 = n * 784 * 4 <= memory / 4
    convert_s, peak_mib = run_measured("convert", "--root", str(root), "--out", str(shards), "--force",
                                       "--quiet", *([] if float32 else ["--no-float32"]))
    shutil.rmtree(root)
    warm = measure(lambda b: FastMNISTLoader(shards, batch_size=b), BATCH, rounds)
    row = {"n": n, "source": "float32" if float32 else "uint8",
           "set_gb": sum(p.stat().st_size for p in shards.iterdir()) / 1e9, "synth_s": synth_s,
           "convert_s": convert_s, "convert_peak_mib": peak_mib, "warm_samples_per_s": warm["samples_per_s"],
           "cold_random": _cold(shards, None), "cold_locality": _cold(shards, LOCALITY),
           "shuffle_quality": _quality(shards, n)}
    shutil.rmtree(shards)
    (work / f".{shards.name}.lock").unlink(missing_ok=True)  # the converter's lock beside the set
    return row


def run_scale(work: Path, out_dir: Path, sizes=SIZES, rounds: int = 3) -> dict:
    """Every size in turn (its files deleted after), then ``scale.json`` and ``scale.png``."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        rows.append(one_size(work, n, rounds))
        print(markdown_row(rows[-1], rows[0]), flush=True)  # as each size is done
    result = {"machine": machine(), "batch_size": BATCH, "cold_batches": COLD_BATCHES, "locality": LOCALITY,
              "read_ahead_kb": read_ahead_kb(work), "rounds": rounds, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(result, out_dir / "scale.png")
    return result


HEADER = ("| N | set | GB | synth s | convert s | convert peak MiB | warm samples/s | x 60k | "
          "cold first batch ms | cold random samples/s | cold locality samples/s | "
          "mixing random / locality (stored) | (sorted by class) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(row: dict, first: dict | None = None) -> str:
    q = row["shuffle_quality"]
    ratio = row["warm_samples_per_s"] / (first or row)["warm_samples_per_s"]
    return (f"| {row['n']:,} | {row['source']} | {row['set_gb']:.2f} | {row['synth_s']:.1f} | "
            f"{row['convert_s']:.1f} | {row['convert_peak_mib']:.0f} | {row['warm_samples_per_s']:,.0f} | "
            f"{ratio:.2f} | {row['cold_random']['first_batch_ms']:.1f} | "
            f"{row['cold_random']['samples_per_s']:,.0f} | {row['cold_locality']['samples_per_s']:,.0f} | "
            f"{q['stored_random']:.3f} / {q['stored_locality']:.3f} | "
            f"{q['sorted_random']:.3f} / {q['sorted_locality']:.3f} |")


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"Scale ({result['machine']}; batch {result['batch_size']}, warm: median of "
             f"{result['rounds']} epochs, cold: first {result['cold_batches']} batches after "
             f"evicting the set, device read-ahead {result['read_ahead_kb']} KB; locality blocks of "
             f"{result['locality']}; mixing: mean total "
             "variation distance of a batch's labels from the set's, 0 is perfect)", "", HEADER]
    lines += [markdown_row(r, rows[0]) for r in rows]
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    """Cost against N on log axes: conversion seconds, peak memory, first-batch latency and
    seconds per million samples read (warm, cold random, cold locality)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = [r["n"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [
        ("seconds", {"convert": [r["convert_s"] for r in rows], "synth": [r["synth_s"] for r in rows],
                     "linear in N": [rows[0]["convert_s"] * k / n[0] for k in n]}),
        ("MiB / ms", {"convert peak RSS (MiB)": [r["convert_peak_mib"] for r in rows],
                      "cold first batch (ms)": [r["cold_random"]["first_batch_ms"] for r in rows]}),
        ("seconds per million samples read", {
            "warm, random": [1e6 / r["warm_samples_per_s"] for r in rows],
            "cold, random": [1e6 / r["cold_random"]["samples_per_s"] for r in rows],
            "cold, locality": [1e6 / r["cold_locality"]["samples_per_s"] for r in rows]}),
    ]
    for ax, (label, lines) in zip(axes, panels, strict=True):
        for name, values in lines.items():
            ax.plot(n, values, "o-" if name != "linear in N" else "k:", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("train images N")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Cost as the set grows (batch {result['batch_size']})\n{result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
