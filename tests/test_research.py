"""Federated partitions and continual-learning task streams, against their references:
Flower Datasets' own partitioners on the same labels, torchvision's MNIST with the task's
permutation or ``rotate`` applied, and an uninterrupted run of the same stream."""

import importlib
import json
import os

import numpy as np
import pytest
import torch
from torchvision import datasets, transforms
from torchvision.transforms import functional as TF

import fastmnist
from fastmnist import FastMNISTError
from fastmnist.formats.idx import read_images, read_labels
from fastmnist.partition import partition
from fastmnist.tasks import permuted_tasks, rotated_tasks, split_tasks, task_permutation

from .conftest import INDEXED_N, batch_indices, write_split


def _flower():
    """flwr_datasets.partitioner, required in CI (tools/setup.sh installs it)."""
    if os.environ.get("CI"):
        return importlib.import_module("flwr_datasets.partitioner")
    return pytest.importorskip("flwr_datasets.partitioner")


def _flower_clients(partitioner, labels: np.ndarray) -> list[list[int]]:
    import datasets as hf

    partitioner.dataset = hf.Dataset.from_dict({"label": labels.tolist(), "i": list(range(len(labels)))})
    return [sorted(partitioner.load_partition(c)["i"]) for c in range(partitioner.num_partitions)]


@pytest.fixture(scope="module")
def real_labels(real_shards) -> np.ndarray:
    return np.asarray(fastmnist.open_shards(real_shards).split("test").array("labels"))


@pytest.mark.parametrize("method, mine, theirs", [
    ("dirichlet", {"alpha": 0.5}, lambda f: f.DirichletPartitioner(50, "label", alpha=0.5, seed=7)),
    ("dirichlet", {"alpha": 0.3, "self_balancing": True, "min_partition_size": 5},
     lambda f: f.DirichletPartitioner(50, "label", alpha=0.3, self_balancing=True, min_partition_size=5,
                                      seed=7)),
    ("pathological", {"num_classes_per_partition": 2},
     lambda f: f.PathologicalPartitioner(50, "label", num_classes_per_partition=2, seed=7)),
    ("pathological", {"num_classes_per_partition": 3, "class_assignment_mode": "first-deterministic"},
     lambda f: f.PathologicalPartitioner(50, "label", 3, class_assignment_mode="first-deterministic",
                                         seed=7)),
])
def test_partitions_are_flowers_own_on_the_real_labels(real_labels, method, mine, theirs):
    """The same seed gives the same clients as Flower Datasets' partitioner (so the same
    label skew), client for client, on the real test labels."""
    ours = partition(real_labels, 50, method, seed=7, **mine)
    assert [c.tolist() for c in ours.clients] == _flower_clients(theirs(_flower()), real_labels)


def test_shards_are_flowers_own_over_the_label_sorted_set(real_labels):
    """Flower's ShardPartitioner works on a dataset sorted by label: given that, its clients
    (as positions of the sorted set) are ours (10,000 samples, 50 clients of 2 shards: it divides)."""
    ours = partition(real_labels, 50, "shards", seed=7, num_shards_per_partition=2)
    order = np.argsort(real_labels, kind="stable")
    flower = _flower().ShardPartitioner(50, "label", num_shards_per_partition=2, seed=7)
    assert [c.tolist() for c in ours.clients] == [sorted(order[p].tolist())
                                                  for p in _flower_clients(flower, real_labels[order])]


@pytest.mark.parametrize("method, params", [("iid", {}),
                                            ("dirichlet", {"alpha": 0.3, "min_partition_size": 0}),
                                            ("pathological", {"num_classes_per_partition": 2}),
                                            ("shards", {"num_shards_per_partition": 3})])
def test_partitions_are_disjoint_cover_the_split_and_repeat_from_the_seed(real_labels, method, params):
    n = len(real_labels)
    first = partition(real_labels, 37, method, seed=3, **params)
    everyone = np.concatenate(first.clients)
    assert len(first) == 37 and np.array_equal(np.sort(everyone), np.arange(n))  # each sample once
    again, other = partition(real_labels, 37, method, seed=3, **params), partition(real_labels, 37, method,
                                                                                 seed=4, **params)
    assert again.digest == first.digest and other.digest != first.digest
    assert first.counts.sum() == n and np.array_equal(first.counts.sum(0), np.bincount(real_labels))
    if method == "pathological":
        assert ((first.counts > 0).sum(1) == 2).all()  # exactly k classes each
    if method == "iid":
        assert max(map(len, first.clients)) - min(map(len, first.clients)) <= 1


def test_dirichlet_minimum_size_holds_and_alpha_sets_the_skew(real_labels):
    """Smaller alpha, more skew: the mean per-client label entropy falls with alpha."""
    def entropy(part):
        p = part.counts / part.counts.sum(1, keepdims=True)
        return float(np.mean(-(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(1)))

    skewed = partition(real_labels, 20, "dirichlet", alpha=0.1, min_partition_size=50, seed=1)
    assert min(map(len, skewed.clients)) >= 50
    near_iid = partition(real_labels, 20, "dirichlet", alpha=100.0, seed=1)
    assert entropy(skewed) < 1.0 < 2.2 < entropy(near_iid) <= np.log(10)


@pytest.mark.parametrize("call, message", [
    (lambda labels: partition(labels, 10, "dirichlet", alpha=0), "alpha must be > 0"),
    (lambda labels: partition(labels, 10, "dirichlet", alpha=-1.0), "alpha must be > 0"),
    (lambda labels: partition(labels, 10_001, "iid"), "more than the 10000 samples"),
    (lambda labels: partition(labels, 100, "dirichlet", alpha=0.5, min_partition_size=101),
     "need 10100; the split has 10000"),
    (lambda labels: partition(labels, 1000, "dirichlet", alpha=0.05, min_partition_size=9),
     "no draw in 11 gave every client 9 samples"),
    (lambda labels: partition(labels, 3, "pathological", num_classes_per_partition=2, seed=0),
     "fall to no client"),
    (lambda labels: partition(labels, 3, "pathological", num_classes_per_partition=11), "must be in 1..10"),
    (lambda labels: partition(labels, 3, "shuffled"), "method must be one of"),
    (lambda labels: partition(labels, 3, "dirichlet", alpha=1.0, beta=2),
     "unexpected keyword argument 'beta'"),
    (lambda labels: partition(labels.astype(float), 3), "one integer class label per sample"),
])
def test_bad_partition_arguments_are_refused_saying_what(real_labels, call, message):
    with pytest.raises(FastMNISTError, match=message):
        call(real_labels)


def test_a_client_loader_visits_its_samples_once_an_epoch_with_a_held_out_test_part(indexed_shards):
    clients = partition(indexed_shards, 7, "dirichlet", alpha=0.5, min_partition_size=20, seed=0)
    mine = clients[3]
    loader = clients.loader(3, batch_size=16, normalize=False, seed=1)
    first, second = [sum(batch_indices(loader), []) for _ in range(2)]
    assert sorted(first) == sorted(second) == mine.tolist() and first != second
    parts = clients.holdout(3, test_fraction=0.25, seed=2)
    assert np.array_equal(np.sort(np.concatenate([parts["train"], parts["test"]])), mine)
    assert abs(len(parts["test"]) - 0.25 * len(mine)) <= 1
    held = clients.loader(3, indices=parts["test"], batch_size=8, normalize=False, shuffle=False)
    assert sum(batch_indices(held), []) == parts["test"].tolist()
    assert clients.record()["digest"] == clients.digest and sum(clients.record()["sizes"]) == INDEXED_N


def test_the_partition_command_prints_the_table_and_draws_the_heat_map(indexed_shards, tmp_path, capsys):
    from fastmnist.cli import main

    png, record = tmp_path / "skew.png", tmp_path / "partition.json"
    asked = ["partition", str(indexed_shards), "--clients", "5", "--method", "dirichlet"]
    code = main([*asked, "--alpha", "0.5", "--min-size", "5", "--png", str(png), "--out", str(record)])
    out = capsys.readouterr().out
    expected = partition(indexed_shards, 5, "dirichlet", alpha=0.5, min_partition_size=5)
    assert code == 0 and expected.digest in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    sizes = [len(c) for c in expected.clients]
    table = [[s, *k] for s, k in zip(sizes, expected.counts.tolist(), strict=True)]
    assert [[int(v) for v in r[1:]] for r in rows] == table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(record.read_text())
    assert saved["digest"] == expected.digest and saved["clients"][2] == expected[2].tolist()
    assert main([*asked, "--alpha", "0"]) == 2


def _reference(torchvision_test_root, image_op) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's MNIST test split through ``image_op`` (PIL -> PIL) then the tutorial's
    ToTensor and Normalize, stacked: float32 ``[10000, 1, 28, 28]``, int64 labels."""
    tf = transforms.Compose([transforms.Lambda(image_op), transforms.ToTensor(),
                             transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(torchvision_test_root, train=False, transform=tf)
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def _whole(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_a_permuted_task_is_torchvisions_tensor_with_its_permutation(real_shards, torchvision_test_root):
    x_ref, y_ref = _reference(torchvision_test_root, lambda img: img)
    stream = permuted_tasks(real_shards, 3, split="test", permutation_seed=5, batch_size=1000, shuffle=False)
    for t in range(3):
        x, y = _whole(stream.loader(t))
        perm = task_permutation(5, t)
        assert torch.equal(y, y_ref)
        assert torch.equal(x, x_ref.flatten(1)[:, perm].view_as(x_ref))  # bit for bit
    assert torch.equal(task_permutation(5, 0), torch.arange(784))
    assert not torch.equal(task_permutation(5, 1), task_permutation(5, 2))
    assert torch.equal(task_permutation(5, 2), task_permutation(5, 2)) and \
        not torch.equal(task_permutation(5, 1), task_permutation(6, 1))


def test_a_rotated_task_is_torchvisions_rotate(real_shards, torchvision_test_root):
    stream = rotated_tasks(real_shards, [0.0, 33.0, -75.5], split="test", batch_size=1000, shuffle=False)
    for t, angle in enumerate([0.0, 33.0, -75.5]):
        x_ref, _ = _reference(torchvision_test_root, lambda img, a=angle: TF.rotate(img, a))
        x, _ = _whole(stream.loader(t))
        assert torch.equal(x, x_ref), f"task {t}: {int((x != x_ref).sum())} pixels differ"


def test_a_split_task_yields_only_its_classes_with_task_ids(real_shards, real_labels):
    groups = [[0, 1], [2, 3, 4], [9]]
    stream = split_tasks(real_shards, groups, split="test", batch_size=256, task_ids=True, seed=3)
    assert len(stream) == 3
    for t, loader in stream:
        ys, ts = [], []
        for _, y, task in loader:
            ys.append(y)
            ts.append(task)
        y = torch.cat(ys)
        assert sorted(y.tolist()) == sorted(real_labels[np.isin(real_labels, groups[t])].tolist())
        assert (torch.cat(ts) == t).all()


@pytest.mark.parametrize("groups, message", [([[0, 1], [1, 2]], "class 1 is in task 0 and task 1"),
                                             ([[0, 10]], "class 10 .* is not a class of this set"),
                                             ([[0], []], "task 1 has no class"), ([], "no task")])
def test_bad_class_groups_are_refused(indexed_shards, groups, message):
    with pytest.raises(FastMNISTError, match=message):
        split_tasks(indexed_shards, groups)


def _stream(kind, shards, **kw):
    if kind == "split":
        return split_tasks(shards, [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]], batch_size=32, normalize=False, **kw)
    return permuted_tasks(shards, 3, batch_size=32, permutation_seed=1, **kw)


def _run(stream, epochs: int, stop_after: int | None = None):
    """Every batch of every task's ``epochs`` epochs (as lists of uint8 pixel sums and
    labels); with ``stop_after``, stops after that many batches and returns the state too."""
    seen = []
    for _, loader in stream:
        while loader.epoch < epochs:
            for x, y in loader:
                seen.append((x.flatten(1).double().sum(1).tolist(), y.tolist()))
                if stop_after is not None and len(seen) == stop_after:
                    return seen, json.loads(json.dumps(stream.state_dict()))
    return seen, None


@pytest.mark.parametrize("kind", ["split", "permuted"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_stream_stopped_anywhere_continues_as_the_uninterrupted_run(indexed_shards, kind, world_size):
    """Stopped mid-task, at a task's last batch (the boundary) and mid-epoch of a later
    task, then continued from the state in a new stream: the uninterrupted run's batches."""
    for rank in range(world_size):
        whole, _ = _run(_stream(kind, indexed_shards, rank=rank, world_size=world_size, seed=4), epochs=2)
        per_task = [2 * len(_stream(kind, indexed_shards, rank=rank, world_size=world_size).loader(t))
                    for t in range(3)]
        boundary = per_task[0]
        for stop in (5, boundary, boundary + per_task[1] + 3):
            stream, resumed = (_stream(kind, indexed_shards, rank=rank, world_size=world_size, seed=4)
                               for _ in range(2))
            head, state = _run(stream, 2, stop)
            resumed.load_state_dict(state)
            tail, _ = _run(resumed, epochs=2)
            assert head + tail == whole, f"rank {rank}, stopped after {stop} batches"


def test_a_stream_state_is_checked_against_the_stream(indexed_shards):
    stream = _stream("split", indexed_shards)
    state = stream.state_dict()
    with pytest.raises(FastMNISTError, match="another task stream"):
        _stream("permuted", indexed_shards).load_state_dict(state)
    with pytest.raises(FastMNISTError, match="task must be an integer in 0..3"):
        _stream("split", indexed_shards).load_state_dict({**state, "task": 7})
    with pytest.raises(FastMNISTError, match="not a fastmnist task stream state"):
        stream.load_state_dict({"task": 1})


@pytest.mark.parametrize("page, expect", [
    ("federated", r"round 9: test accuracy (0\.\d+)"),
    ("continual", r"after task 2: accuracy on tasks 0..2: (\S+) \S+ \S+")])
def test_the_documented_example_runs(page, expect, real_root, tmp_path):
    """docs/research/<page>.md's example as printed (real test digits as both splits: train
    on them, score on them), run in a fresh interpreter: it trains, and learns."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "research" / f"{page}.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    raw = real_root / "MNIST" / "raw"
    images = read_images(raw / "t10k-images-idx3-ubyte.gz").reshape(-1, 28, 28)
    labels = read_labels(raw / "t10k-labels-idx1-ubyte.gz")
    for split in ("train", "test"):  # the real test digits as both splits
        write_split(tmp_path / "data", split, images, labels)
    fastmnist.convert(tmp_path / "data", tmp_path / "shards" / "mnist", progress=False)
    (tmp_path / "example.py").write_text(example)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(re.search(expect, done.stdout).group(1)) > 0.8, done.stdout
