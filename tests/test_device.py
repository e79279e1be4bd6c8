"""Where batches are made and pinned, and the loader in worker processes: pinning only for
batches bound for a GPU and never inside a DataLoader worker (checked with CUDA reported
available), a loader that pickles whatever its arguments and runs under ``spawn`` and
``forkserver`` workers with direct iteration's batches, modes that cannot run in a worker
refused, and ``dataset`` on the CPU in every mode."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from fastmnist import FastMNISTError, FastMNISTLoader
from fastmnist.loading.delivery import Grouped, PerBatch

from .conftest import INDEXED_N, batch_indices


@pytest.fixture
def cuda_reported(monkeypatch):
    """A process where ``torch.cuda.is_available()`` says yes (as on a GPU machine); nothing
    may actually call CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_a_cpu_loader_does_not_pin_by_default_where_cuda_is(indexed_shards, cuda_reported):
    loader = FastMNISTLoader(indexed_shards, batch_size=64, normalize=False)
    assert loader.pin_memory is False and isinstance(loader._delivery, Grouped)
    assert sum(batch_indices(loader), []) != [] and len(sum(batch_indices(loader), [])) == INDEXED_N


def test_a_dataloader_worker_never_pins(indexed_shards, cuda_reported):
    """pin_memory=True asked for, inside forked DataLoader workers: the batches are made
    unpinned (pinning there would call CUDA in a forked child; the DataLoader's own
    pin_memory=True pins in the main process): the same batches as a loader that never pins."""
    pinned = FastMNISTLoader(indexed_shards, batch_size=50, normalize=False, pin_memory=True)
    assert isinstance(pinned._delivery, PerBatch) and pinned._delivery.pin
    got = batch_indices(DataLoader(pinned, batch_size=None, num_workers=2, multiprocessing_context="fork"))
    assert got == batch_indices(FastMNISTLoader(indexed_shards, batch_size=50, normalize=False))


TRANSFORM = transforms.Compose([transforms.RandomAffine(15, translate=(0.1, 0.1)), transforms.ToTensor(),
                                transforms.Normalize((0.1307,), (0.3081,))])


@pytest.mark.parametrize("kwargs", [{"images": "uint8"}, {"transform": TRANSFORM}, {"images": "float32"}])
@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_the_loader_pickles_and_runs_in_spawned_workers(real_shards, kwargs, context):
    """Whatever its arguments (a uint8 set normalised per batch, a transform), the loader
    pickles, and DataLoader workers started by spawn or forkserver (the default on macOS
    and Windows, and on Linux from Python 3.14) give direct iteration's batches."""
    def make():
        return FastMNISTLoader(real_shards, "test", batch_size=500, seed=2, **kwargs)

    pickle.loads(pickle.dumps(make()))
    direct = list(make())
    workers = list(DataLoader(make(), batch_size=None, num_workers=2, multiprocessing_context=context))
    assert len(workers) == len(direct) == 20
    for (x, y), (wx, wy) in zip(direct, workers, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)


def test_a_resident_loader_is_refused_in_a_worker_saying_what_to_do(indexed_shards):
    loader = FastMNISTLoader(indexed_shards, batch_size=50, resident=True)
    refusal = "resident=True cannot run in a DataLoader worker.*pin_memory=True"
    with pytest.raises(FastMNISTError, match=refusal):
        list(DataLoader(loader, batch_size=None, num_workers=1))


@pytest.mark.parametrize("kwargs", [{}, {"resident": True}, {"images": "uint8"}, {"normalize": False}])
def test_the_dataset_is_on_the_cpu_in_every_mode(real_shards, kwargs):
    """``dataset[i]`` and ``targets`` on the CPU, as torchvision's MNIST gives them (on a GPU
    machine, ``tests/test_gpu.py`` checks the same with device="cuda")."""
    loader = FastMNISTLoader(real_shards, "test", **kwargs)
    x, y = loader.dataset[3]
    reference = FastMNISTLoader(real_shards, "test", batch_size=4, shuffle=False, **kwargs)
    first_x, first_y = next(iter(reference))
    assert x.device.type == loader.dataset.targets.device.type == "cpu"
    assert torch.equal(x, first_x[3]) and y == int(first_y[3]) == int(loader.dataset.targets[3])
