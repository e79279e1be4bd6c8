"""``fastmnist bench``: measure every pipeline in one run, print the table, write JSON,
Markdown and a PNG chart whose numbers are the table's."""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import __version__
from ..loader import FastMNISTLoader
from ..store import open_shards
from .pipelines import (
    BALANCED,
    COUNTED,
    FAST_AFFINE,
    FLOOR,
    MIXTURE,
    SEED,
    SEED_AFFINE,
    SUBSET,
    PeakRSS,
    augmented,
    copy_bandwidth,
    holdout_cost,
    pipelines,
    rss_bytes,
    run_epoch,
    run_round,
    state_dict_cost,
)

IMAGE_BYTES = 28 * 28 * 4  # one float32 image
UNSTEADY = 0.25  # a floor whose rounds spread more than this (IQR / median) cannot anchor a ratio
ROUND_AT_LEAST = 0.25  # seconds of whole epochs a round lasts at least (a fast epoch is ~15 ms)
SLOW = ("seed pipeline", "stock webdataset")  # measured with --seed-rounds rounds
WORKERS_2, STATEFUL_2 = "fastmnist in DataLoader, workers=2", "fastmnist in StatefulDataLoader, workers=2"
STATEFUL_2_64 = STATEFUL_2 + ", snapshot every 64 steps"
COUNTED_2 = f"{COUNTED} in DataLoader, workers=2"
COUNTED_STATEFUL_2 = f"{COUNTED} in StatefulDataLoader, workers=2"


def run_report(raw_root: Path, shards: Path, out_dir: Path, batch_sizes=(64,), rounds: int = 5,
               seed_rounds: int = 3, memory_epochs: int = 20, progress: bool = True, min_seconds: float = 1.0,
               round_seconds: float | None = 2.0) -> dict:
    """Measure, then write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir``.
    Per batch size the pipelines are timed round by round, interleaved (one round of each in
    turn), so a disturbance of the machine lands on all of them; each gets at least its
    rounds (``seed_rounds`` for the slow ones) and the fast ones at least ``min_seconds``. A
    round is shuffled epochs for at least ``ROUND_AT_LEAST`` seconds, the last cut after
    ``round_seconds`` (None: whole epochs): a slow pipeline's rate is measured as well in two
    seconds as in its whole epoch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    found = pipelines(raw_root, shards)
    rows = []
    per_size = [{name: f for name, f in found.items() if bs == batch_sizes[0] or not augmented(name)}
                for bs in batch_sizes]  # the augmentation rows at the first batch size only
    for bs, pipelines_of_size in zip(batch_sizes, per_size, strict=True):
        wanted = {name: seed_rounds if name.startswith(SLOW) else rounds for name in pipelines_of_size}
        rows += interleaved(pipelines_of_size, bs, wanted, min_seconds, round_seconds, progress,
                            ROUND_AT_LEAST)
    bandwidth = copy_bandwidth()
    for bs in batch_sizes:
        group = {r["pipeline"]: r for r in rows if r["batch_size"] == bs}
        floor = group[FLOOR]
        for r in group.values():
            r["x_seed"] = r["samples_per_s"] / group[SEED]["samples_per_s"]
            r["of_floor"] = r["samples_per_s"] / floor["samples_per_s"]
            r["floor_unsteady"] = floor["spread"] > UNSTEADY
            r["of_copy_bandwidth"] = r["samples_per_s"] * IMAGE_BYTES / bandwidth
    result = {
        "machine": machine(),
        "fastmnist": __version__,
        "shards": str(shards),
        "synthetic": open_shards(shards).synthetic,
        "round_seconds": round_seconds,
        "rows": rows,
        "conversion": _conversion(raw_root, rows, open_shards(shards).split("train").count),
        "memory": _memory_over_epochs(shards, memory_epochs),
        "state_dict": state_dict_cost(shards),
        "holdout_ms": holdout_cost(shards),
        "copy_bandwidth_bytes_per_s": bandwidth,
    }
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "bench.md").write_text(markdown(result))
    chart(result, out_dir / "bench.png")
    return result


def interleaved(found: dict, batch_size: int, wanted: dict, min_seconds: float,
                round_seconds: float | None = None, progress: bool = False,
                round_at_least: float = 0.0) -> list:
    """One row per pipeline of ``found`` (name -> factory): each built once and its time to
    the first batch taken, then rounds timed one of each pipeline in turn, while it has
    fewer than ``wanted[name]`` or (with more than one wanted) less than ``min_seconds`` of
    them. A round is whole epochs until ``round_at_least`` seconds have passed (so a round
    of a fast pipeline outlasts the machine's hiccups), the last cut after
    ``round_seconds`` unless None (``cut``: some round was). Samples/s is the median of the
    rounds' rates, ``spread`` their interquartile range over that median; ``peak_extra_mb``
    the most resident memory a round added. ``progress``: a line per pipeline as it is
    built, then a bar of rounds."""
    built, rows = {}, {}
    for name, factory in found.items():
        if progress:
            tqdm.write(f"bench, batch {batch_size}: starting {name}")
        start = time.perf_counter()
        built[name] = factory(batch_size)
        next(iter(built[name]))
        rows[name] = {"batch_size": batch_size, "pipeline": name, "samples": [], "seconds": [], "cut": False,
                      "peak_extra_mb": 0.0, "first_batch_ms": (time.perf_counter() - start) * 1e3}

    def needs_more(name):
        seconds = rows[name]["seconds"]
        return len(seconds) < wanted[name] or (wanted[name] > 1 and sum(seconds) < min_seconds)

    with tqdm(total=sum(wanted.values()), desc=f"bench, batch {batch_size}", unit="round",
              disable=not progress) as bar:
        while active := [name for name in found if needs_more(name)]:
            for name in active:
                row = rows[name]
                with PeakRSS() as rss:
                    samples, seconds, cut = run_round(built[name], round_seconds, round_at_least)
                row["samples"].append(samples)
                row["seconds"].append(seconds)
                row["cut"] |= cut
                row["peak_extra_mb"] = max(row["peak_extra_mb"], rss.peak_extra / 1e6)
                bar.update(1)
    for r in rows.values():
        rates = sorted(n / s for n, s in zip(r["samples"], r["seconds"], strict=True))
        r["rounds"] = len(rates)
        r["samples_per_s"] = statistics.median(rates)
        q1, _, q3 = statistics.quantiles(rates, n=4, method="inclusive") if len(rates) > 1 else rates * 3
        r["spread"] = (q3 - q1) / r["samples_per_s"]
    return list(rows.values())


def reference_from(result: dict, tolerance: float) -> dict:
    """The gate's reference: this run's fraction of the floor for every fastmnist pipeline
    (above 1 is noise in the floor's timing, so it is kept as 1). Not the ratio to the seed
    pipeline: the seed's per-sample Python ran at 3.3k samples/s on one project machine and
    26k on another of the same description, the floor far less apart."""
    ratios = {}
    for r in result["rows"]:
        if r["pipeline"].startswith("fastmnist"):
            ratios.setdefault(str(r["batch_size"]), {})[r["pipeline"]] = {"of_floor": min(r["of_floor"], 1.0)}
    return {"machine": result["machine"], "tolerance": tolerance, "ratios": ratios}


def check(result: dict, reference: dict, tolerance: float | None = None) -> list[str]:
    """One message per ratio that fell more than ``tolerance`` (a fraction; default the
    reference's) below the reference; pipelines or batch sizes not measured are skipped."""
    tolerance = reference["tolerance"] if tolerance is None else tolerance
    failures = []
    for r in result["rows"]:
        if r["floor_unsteady"]:
            continue  # no ratio to judge (warnings_of says so)
        expected = reference["ratios"].get(str(r["batch_size"]), {}).get(r["pipeline"], {})
        for key, ref in expected.items():
            if r[key] < ref * (1 - tolerance):
                failures.append(f"batch {r['batch_size']} {r['pipeline']}: {key} {r[key]:.2f} is "
                                f"more than {tolerance:.0%} below the reference {ref:.2f}")
    return failures


def machine() -> str:
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores, {cuda}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _conversion(raw_root: Path, rows: list, count: int, runs: int = 3) -> dict:
    """Whole-process conversions, as a user runs them (``python -m fastmnist.cli convert
    --force --quiet``, the same as ``python tools/convert.py``: interpreter start, imports,
    read, validate, normalise, write, hash, replace the previous set), median of ``runs``
    per format, against one seed-pipeline epoch of ``count`` samples at its measured rate;
    and the CLI's start-up (``--help``)."""
    seed_s = count / next(r for r in rows if r["pipeline"] == SEED)["samples_per_s"]
    cli = [sys.executable, "-m", "fastmnist.cli"]
    result = {"seed_epoch_s": seed_s, "runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        for format in ("npy", "both"):
            command = [*cli, "convert", "--root", str(raw_root), "--out", f"{tmp}/{format}",
                       "--format", format, "--force", "--quiet"]
            seconds = statistics.median(_timed(command) for _ in range(runs))
            result[format] = {"seconds": seconds, "fraction_of_seed_epoch": seconds / seed_s}
    result["cli_help_s"] = statistics.median(_timed([*cli, "--help"]) for _ in range(5))
    return result


def _timed(command: list[str]) -> float:
    """Seconds ``command`` ran, start to exit; it must succeed."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _memory_over_epochs(shards: Path, epochs: int) -> dict:
    """Resident memory after each of ``epochs`` epochs of the default loader."""
    loader = FastMNISTLoader(shards)
    after = []
    for _ in range(epochs):
        run_epoch(loader)
        after.append(rss_bytes() / 1e6)
    return {"epochs": epochs, "rss_mb_after_each": after,
            "growth_after_first_mb": after[-1] - after[0]}


def warnings_of(result: dict) -> list[str]:
    """Why some ratios of this run are not results: a floor whose rounds spread more than
    ``UNSTEADY``, a gather faster than this machine can copy memory."""
    found = []
    for r in result["rows"]:
        if r["pipeline"] == FLOOR and r["floor_unsteady"]:
            found.append(f"batch {r['batch_size']}: the floor's rounds spread {r['spread']:.0%} (IQR over "
                         f"median, more than {UNSTEADY:.0%}): the machine was busy; its 'of floor' ratios "
                         "are not shown")
        if r["pipeline"].startswith("fastmnist") and r["of_copy_bandwidth"] > 1:
            found.append(f"batch {r['batch_size']} {r['pipeline']}: {r['of_copy_bandwidth']:.2f} of this "
                         "machine's copy bandwidth is impossible: the copy measurement was disturbed")
    return found


def _of_floor(r: dict) -> str:
    return "n/a (floor unsteady)" if r["floor_unsteady"] else f"{r['of_floor']:.2f}"


def markdown(result: dict) -> str:
    cut = result.get("round_seconds")
    rounds = f"a round is shuffled epochs for at least {ROUND_AT_LEAST:g} s" + (
        "" if cut is None else f", the last stopped after {cut:g} s (rounds column: *)")
    lines = [
        f"Machine: {result['machine']}. Data: {'SYNTHETIC ' if result['synthetic'] else ''}"
        f"MNIST-format train split, {rounds}, float32 out; "
        "samples/s is the median over rounds, interleaved with the other pipelines of its batch size; "
        "spread is the interquartile range of the rounds over that median.",
        "",
        *(f"**WARNING** {w}." for w in warnings_of(result)),
        "",
        "| batch | pipeline | samples/s | spread | x seed (workers=0) | of floor | first batch ms "
        "| extra MB during epochs | rounds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['batch_size']} | {r['pipeline']} | {r['samples_per_s']:,.0f} | "
                     f"{r['spread']:.0%} | {r['x_seed']:.1f} | {_of_floor(r)} | {r['first_batch_ms']:.1f} | "
                     f"{r['peak_extra_mb']:.0f} | {r['rounds']}{'*' if r['cut'] else ''} |")
    c, m = result["conversion"], result["memory"]
    lines += [
        "",
        f"Conversion, whole process (`python -m fastmnist.cli convert --force --quiet`, median of "
        f"{c['runs']}): npy {c['npy']['seconds']:.2f} s = {c['npy']['fraction_of_seed_epoch']:.3f}, "
        f"--format both {c['both']['seconds']:.2f} s = {c['both']['fraction_of_seed_epoch']:.3f} "
        f"of one seed-pipeline epoch ({c['seed_epoch_s']:.2f} s). "
        f"CLI start-up (`fastmnist --help`): {c['cli_help_s']:.2f} s.",
        f"Resident memory over {m['epochs']} epochs of FastMNISTLoader: "
        f"{m['rss_mb_after_each'][0]:.0f} MB after the first, {m['rss_mb_after_each'][-1]:.0f} MB "
        f"after the last ({m['growth_after_first_mb']:+.1f} MB).",
        "state_dict() mid-epoch: " + ", ".join(
            f"{v['state_dict_us']:.1f} us at {v['samples']:,} samples" for v in result["state_dict"].values())
        + " (median of 2,000 calls).",
    ]
    bandwidth = result["copy_bandwidth_bytes_per_s"]
    for r in result["rows"]:
        if r["pipeline"] == "fastmnist float32" and r["of_copy_bandwidth"] <= 1:
            # each sample's 3,136 image bytes read and written once
            lines.append(f"Batch {r['batch_size']}: fastmnist float32 gathers "
                         f"{r['samples_per_s'] * IMAGE_BYTES / 1e9:.2f} GB/s of images, "
                         f"{r['of_copy_bandwidth']:.2f} of this machine's copy bandwidth "
                         f"({bandwidth / 1e9:.1f} GB/s: one 256 MB copy_, median of 5).")
    for bs in dict.fromkeys(r["batch_size"] for r in result["rows"]):
        group = {r["pipeline"]: r["samples_per_s"] for r in result["rows"] if r["batch_size"] == bs}
        if {FAST_AFFINE, SEED_AFFINE, "fastmnist float32", "fastmnist uint8"} <= group.keys():
            affine = group[FAST_AFFINE]
            lines.append(f"Batch {bs}: FastMNISTLoader with the recipe's RandomAffine (nearest) runs at "
                         f"{affine / group['fastmnist float32']:.2f} of the un-augmented loader (float32; "
                         f"{affine / group['fastmnist uint8']:.2f} of uint8, the path it shares) and "
                         f"{affine / group[SEED_AFFINE]:.0f}x the seed pipeline with "
                         "the same transform (workers=0).")
        if {SUBSET, BALANCED, MIXTURE, "fastmnist float32"} <= group.keys():
            plain = group["fastmnist float32"]
            lines.append(f"Batch {bs}: choosing samples, as a fraction of the plain loader: a 50,000-sample "
                         f"subset {group[SUBSET] / plain:.2f}, class-balanced weighted draws "
                         f"{group[BALANCED] / plain:.2f}, a mixture of two splits "
                         f"{group[MIXTURE] / plain:.2f}; "
                         f"a stratified hold-out of the train split takes {result['holdout_ms']:.1f} ms "
                         "(median of 20).")
        if {WORKERS_2, STATEFUL_2, STATEFUL_2_64, COUNTED_2, COUNTED_STATEFUL_2} <= group.keys():
            lines.append(f"Batch {bs}: StatefulDataLoader(num_workers=2) runs at "
                         f"{group[STATEFUL_2] / group[WORKERS_2]:.2f} of DataLoader(num_workers=2) over "
                         f"the same loader snapshotting every step (its default), "
                         f"{group[STATEFUL_2_64] / group[WORKERS_2]:.2f} every 64 steps; over an "
                         f"index_select dataset whose state is one counter, "
                         f"{group[COUNTED_STATEFUL_2] / group[COUNTED_2]:.2f} every step "
                         "(torchdata's own cost).")
    lines.append("")
    return "\n".join(lines)


HEADLINE = (SEED, "seed pipeline, workers=2", "TensorDataset + DataLoader", FLOOR, "fastmnist float32",
            SEED_AFFINE, FAST_AFFINE, "stock webdataset", "fastmnist wds over HTTP")


def headline(result: dict) -> str:
    """The table's ``HEADLINE`` rows at the run's first batch size, as a short Markdown table."""
    bs = result["rows"][0]["batch_size"]
    rows = {r["pipeline"]: r for r in result["rows"] if r["batch_size"] == bs}
    lines = [f"| batch {bs} | samples/s | spread | x seed pipeline | of floor |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {rows[name]['samples_per_s']:,.0f} | {rows[name]['spread']:.0%} | "
              f"{rows[name]['x_seed']:.1f} | {_of_floor(rows[name])} |" for name in HEADLINE if name in rows]
    return "\n".join(lines) + "\n"


def kind_of(pipeline: str) -> str:
    """The chart's group of a pipeline: "streaming" (tar shards read as a stream, local or
    remote), "workers" (DataLoader worker processes) or "in-process"."""
    if "webdataset" in pipeline or " over " in pipeline:
        return "streaming"
    if "workers=" in pipeline and "workers=0" not in pipeline:
        return "workers"
    return "in-process"


def chart(result: dict, path: Path) -> None:
    """Horizontal bars of samples/s (log scale) at the run's first batch size (where every
    pipeline, augmentation included, was measured), grouped in-process / workers /
    streaming, a dashed line at the floor; each bar labelled with its ratio to the seed
    pipeline (one decimal under 10). Titled SYNTHETIC when the data is generated, and
    carrying the run's warnings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [result["rows"][0]["batch_size"]]
    rows = [r for r in result["rows"] if r["batch_size"] in sizes]
    kinds = ("in-process", "workers", "streaming")
    names = sorted(dict.fromkeys(r["pipeline"] for r in rows), key=lambda n: kinds.index(kind_of(n)))
    warned = [w for w in warnings_of(result) if w.startswith(f"batch {sizes[0]}")]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * len(names) * len(sizes) + 0.2 * len(warned)))
    height = 0.8 / len(sizes)
    for k, bs in enumerate(sizes):
        by_name = {r["pipeline"]: r for r in rows if r["batch_size"] == bs}
        here = [n for n in names if n in by_name]  # the augmentation rows are at one batch size
        ys = [names.index(n) + k * height for n in here]
        bars = ax.barh(ys, [by_name[n]["samples_per_s"] for n in here], height=height, label=f"batch {bs}")
        ax.axvline(by_name[FLOOR]["samples_per_s"], color=bars.patches[0].get_facecolor(), linestyle="--",
                   linewidth=0.8)
        for bar, n in zip(bars, here, strict=True):
            ratio = by_name[n]["x_seed"]
            ax.text(bar.get_width() * 1.05, bar.get_y() + bar.get_height() / 2,
                    f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x", va="center", fontsize=7)
    middle = height * (len(sizes) - 1) / 2  # from a name's first bar to the middle of its bars
    ax.set_yticks([i + middle for i in range(len(names))], names, fontsize=8)
    for i, name in enumerate(names):  # each group titled, and ruled off from the one before
        if i == 0 or kind_of(name) != kind_of(names[i - 1]):
            if i:
                ax.axhline(i + middle - 0.5, color="grey", linewidth=0.6)
            ax.text(0.99, i + middle - 0.45, kind_of(name), transform=ax.get_yaxis_transform(), ha="right",
                    va="top", fontsize=8, style="italic", color="grey")
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=max(r["samples_per_s"] for r in rows) * 4)  # room for the labels
    ax.set_xlabel("samples/s, log scale (bar label: x the seed pipeline, workers=0; dashed: the floor)")
    synthetic = "SYNTHETIC data (generated digits, not MNIST): " if result["synthetic"] else ""
    cut = result.get("round_seconds")
    rounds = "shuffled epochs" if cut is None else f"shuffled epochs stopped after {cut:g} s"
    title = [f"{synthetic}{rounds}, batch {sizes[0]}, float32 out", result["machine"],
             *(line for w in warned for line in textwrap.wrap(f"WARNING {w}", 100))]
    ax.set_title("\n".join(title), fontsize=8, color="darkred" if warned else "black")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def extract_for_torchvision(raw_root: Path) -> None:
    """Extract any ``.gz`` raw file whose extracted twin is missing (torchvision reads those)."""
    from torchvision.datasets.utils import extract_archive

    for gz in raw_root.glob("*/raw/*.gz"):
        if not gz.with_suffix("").exists():
            extract_archive(str(gz), str(gz.parent))

