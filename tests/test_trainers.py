"""The loader inside the trainers people hand loaders to, each with its real API on 2 CPU
processes: Lightning Fabric (``strategy="ddp"``, ``devices=2``), Hugging Face Accelerate
(``accelerate launch --multi_gpu --num_processes 2``), Ray Train (``TorchTrainer`` with
``ScalingConfig(num_workers=2)`` on a local Ray instance) and Ignite (``idist.Parallel``
with gloo). The jobs (``tests/trainers/``) record the sample indices of every step on every
rank. The reference is the uninterrupted epoch of the same loader on each rank: a trainer
that split the batches again (each rank a quarter of the set) or dropped the split (each
rank all of it) fails the comparison."""

import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fastmnist import FastMNISTLoader

from .conftest import INDEXED_N, batch_indices
from .trainers.record import BATCH_SIZE, SEED

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "tests" / "trainers"
WORLD = 2
STOP_AFTER = 7  # steps before the checkpoint; an epoch is 26 steps per rank


@pytest.fixture(scope="module")
def reference(indexed_shards) -> dict[int, list[list[int]]]:
    """rank -> the sample indices of each batch of its uninterrupted epoch."""
    return {rank: batch_indices(FastMNISTLoader(indexed_shards, "train", batch_size=BATCH_SIZE, seed=SEED,
                                                normalize=False, rank=rank, world_size=WORLD))
            for rank in range(WORLD)}


def _need(trainer: str) -> None:
    """Skip when the trainer is not installed, except in CI (the dev extra installs them all)."""
    module = {"fabric": "lightning", "accelerate": "accelerate", "ignite": "ignite",
              "ray": "ray.train"}[trainer]
    if os.environ.get("CI"):
        importlib.import_module(module)
    else:
        pytest.importorskip(module)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(trainer: str) -> list[str]:
    job = str(JOBS / f"{trainer}_job.py")
    if trainer == "accelerate":
        return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                str(WORLD), "--main_process_port", str(_free_port()), job]
    return [sys.executable, job]


def _run(trainer: str, shards: Path, run: Path, phase: str, steps: int = 0) -> float:
    """Run one phase of a trainer's job; its wall time in seconds."""
    run.mkdir(exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run([*_command(trainer), str(shards), str(run), phase, str(steps)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(_free_port())},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return time.perf_counter() - start


def _steps(run: Path, phase: str) -> dict[int, dict[int, list[int]]]:
    """rank -> step -> the sample indices the training step saw, as the job recorded them."""
    out: dict[int, dict[int, list[int]]] = {}
    for path in sorted(run.glob(f"{phase}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            assert r["step"] not in out.setdefault(r["rank"], {}), f"step {r['step']} seen twice"
            out[r["rank"]][r["step"]] = r["indices"]
    return out


def _as_epochs(steps: dict[int, dict[int, list[int]]]) -> dict[int, list[list[int]]]:
    return {rank: [by_step[s] for s in sorted(by_step)] for rank, by_step in steps.items()}


def _check_epoch(epochs: dict[int, list[list[int]]], reference) -> None:
    assert epochs == reference  # batch for batch, on every rank
    assert len({len(batches) for batches in epochs.values()}) == 1  # equal batch counts
    seen = Counter(i for batches in epochs.values() for b in batches for i in b)
    assert set(seen) == set(range(INDEXED_N))  # every sample ...
    assert sum(seen.values()) == INDEXED_N + 1  # ... once, plus the one padding sample of even=True


@pytest.mark.parametrize("trainer", ["fabric", "accelerate", "ignite"])
def test_an_epoch_is_every_sample_once_across_ranks(trainer, indexed_shards, reference, tmp_path):
    _need(trainer)
    _run(trainer, indexed_shards, tmp_path, "epoch")
    _check_epoch(_as_epochs(_steps(tmp_path, "epoch")), reference)


@pytest.mark.parametrize("trainer", ["fabric", "accelerate", "ignite", "ray"])
def test_stopped_and_resumed_through_the_trainers_checkpoint(trainer, indexed_shards, reference, tmp_path):
    """Stopped after 7 steps with a checkpoint through the trainer's own mechanism, then
    resumed from it: the steps before and after are the uninterrupted epoch's. (For Ray,
    the only trainer that takes tens of seconds to start, this is also the exactly-once test.)"""
    _need(trainer)
    _run(trainer, indexed_shards, tmp_path, "stop", STOP_AFTER)
    before = _steps(tmp_path, "stop")
    assert {rank: sorted(s) for rank, s in before.items()} == \
        {r: list(range(STOP_AFTER)) for r in range(WORLD)}
    _run(trainer, indexed_shards, tmp_path, "resume", STOP_AFTER)
    after = _steps(tmp_path, "resume")
    assert all(min(s) == STOP_AFTER for s in after.values())  # resumed at the checkpoint's step
    _check_epoch(_as_epochs({rank: {**before[rank], **after[rank]} for rank in before}), reference)


def test_accelerate_dataloader_that_would_split_again_is_refused(indexed_shards, tmp_path):
    """``accelerator.prepare(loader.as_dataloader())`` would give each rank half of its own
    half: refused on every rank, naming what to do instead."""
    _need("accelerate")
    _run("accelerate", indexed_shards, tmp_path, "refuse")
    for rank in range(WORLD):
        text = (tmp_path / f"refused.rank{rank}.txt").read_text()
        assert "give accelerator.prepare() the FastMNISTLoader itself" in text


@pytest.mark.parametrize("trainer", ["fabric", "accelerate", "ignite", "ray"])
def test_the_documented_example_runs(trainer, indexed_shards, tmp_path):
    """docs/trainers/<trainer>.md's example, as printed (the set's path put in), run with the
    page's launch command for 3 epochs: it trains and writes its checkpoint."""
    _need(trainer)
    page = (REPO / "docs" / "trainers" / f"{trainer}.md").read_text()
    example = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    launch = re.search(r"```bash\n(?:pip install .*\n)(.*?)\s*(#.*)?\n", page).group(1).split()
    programs = {"python": sys.executable, "accelerate": str(Path(sys.executable).parent / "accelerate")}
    command = [programs.get(launch[0], launch[0]), *launch[1:]]
    assert command[-1] == "train.py"
    (tmp_path / "train.py").write_text(example.replace('"shards/mnist"', repr(str(indexed_shards))))
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    written = {"fabric": "checkpoint.ckpt", "accelerate": "checkpoint", "ignite": "checkpoints",
               "ray": "ray_results"}[trainer]
    assert (tmp_path / written).exists()
