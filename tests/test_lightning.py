"""Lightning: a real Trainer on the CPU over FastMNISTDataModule, killed with SIGKILL
mid-epoch after a checkpoint and resumed from ``last``, sees the uninterrupted run's samples,
each once, with the same or another number of processes."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmnist import FastMNISTError, holdout

from .conftest import INDEXED_N, decode_indices
from .lightning_job import VAL_SIZE

# the samples the data module trains on: the indexed set's train split less its validation part
TRAINED = holdout(np.arange(INDEXED_N) % 10, {"train": INDEXED_N - VAL_SIZE, "val": VAL_SIZE},
                  seed=3)["train"]

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "lightning_job.py"
KILL_AFTER_STEP = 12  # checkpoints every 5 steps: the last one before the kill is at step 10 (or later)
STEPS = 26  # per epoch on 2 processes: 502 samples each in batches of 20


def _run(shards, run, devices, resume=False, kill_after=None):
    command = [sys.executable, str(JOB), str(shards), str(run), str(devices), *(["resume"] if resume else [])]
    log = run / f"{'resumed' if resume else 'first'}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if kill_after is None:
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        return
    deadline = time.monotonic() + 600
    while max(s for s, _, _ in _records(run, "first") or [(-1, 0, [])]) < kill_after:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # every process of the job, at once
    proc.wait()


def _records(run, name) -> list[tuple[int, int, list[int]]]:
    """(step, rank, sample indices) of every training step the model saw."""
    out = []
    for path in sorted(run.glob(f"{name}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            if line.endswith("}"):
                r = json.loads(line)
                out.append((r["step"], r["rank"], r["indices"]))
    return out


def _killed_and_resumed(shards, run, devices, resume_devices):
    _run(shards, run, devices, kill_after=KILL_AFTER_STEP)
    saved_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 10 <= saved_at < STEPS  # a checkpoint mid-epoch, at or after the one the kill aimed past
    before = [r for r in _records(run, "first") if r[0] < saved_at]  # what the checkpoint holds
    _run(shards, run, resume_devices, resume=True)
    after = _records(run, "resumed")
    assert min(s for s, _, _ in after) == saved_at  # resumed at the checkpoint's step
    return before, after


@pytest.fixture(scope="module")
def uninterrupted(indexed_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("lightning_reference")
    _run(indexed_shards, run, 2)
    return sorted(_records(run, "first"))


def test_killed_mid_epoch_and_resumed_on_as_many_processes(indexed_shards, tmp_path, uninterrupted):
    before, after = _killed_and_resumed(indexed_shards, tmp_path, 2, 2)
    assert sorted(before + after) == uninterrupted  # every step, every rank, every sample
    seen = Counter(i for _, _, indices in uninterrupted for i in indices)
    assert set(seen) == set(TRAINED.tolist()) and sum(seen.values()) == len(TRAINED) + 1  # 1 pad


def test_killed_mid_epoch_and_resumed_on_one_process(indexed_shards, tmp_path):
    before, after = _killed_and_resumed(indexed_shards, tmp_path, 2, 1)
    assert {rank for _, rank, _ in after} == {0}
    seen = Counter(i for _, _, indices in before + after for i in indices)
    assert seen == Counter(TRAINED.tolist())  # the pad sample of 2 ranks was never reached


def test_the_data_module_augments_training_batches_only(indexed_shards):
    """``transform=`` reaches the train loader (its batches are the loader's own with that
    transform) and never the validation or test loaders."""
    from torchvision import transforms

    from fastmnist import FastMNISTLoader
    from fastmnist.lightning import FastMNISTDataModule

    tf = transforms.Compose([transforms.RandomAffine(15), transforms.ToTensor(),
                             transforms.Normalize((0.1307,), (0.3081,))])
    dm = FastMNISTDataModule(indexed_shards, batch_size=50, seed=2, transform=tf, val_size=None)
    augmented = next(iter(FastMNISTLoader(indexed_shards, batch_size=50, seed=2, transform=tf)))[0]
    plain = next(iter(FastMNISTLoader(indexed_shards, batch_size=50, seed=2)))[0]
    assert torch.equal(next(iter(dm.train_dataloader()))[0], augmented) and not torch.equal(augmented, plain)
    for evaluation in (dm.val_dataloader(), dm.test_dataloader()):
        assert evaluation._augment is None


def test_the_data_module_validates_on_a_part_held_out_of_train(indexed_shards):
    """By default validation is a stratified part of train that the train loader never
    visits; the test split is for testing; val_size=None validates on test."""
    from fastmnist.lightning import FastMNISTDataModule

    dm = FastMNISTDataModule(indexed_shards, batch_size=50, seed=2, val_size=0.1, normalize=False)
    train = {i for x, _ in dm.train_dataloader() for i in decode_indices(x)}
    val = [i for x, _ in dm.val_dataloader() for i in decode_indices(x)]
    assert len(val) == 100 and val == sorted(val) and not train & set(val)
    assert train | set(val) == set(range(INDEXED_N))
    assert np.bincount(np.array(val) % 10).tolist() == [10] * 10  # 100 of 10 equal classes
    assert len(list(dm.test_dataloader())[0][1]) == 10  # the test split's 10 samples
    assert FastMNISTDataModule(indexed_shards, val_size=None).val_dataloader().info.name == "test"
    with pytest.raises(FastMNISTError, match="val_size 5000: expected a count in 1..1002"):
        FastMNISTDataModule(indexed_shards).train_dataloader()
