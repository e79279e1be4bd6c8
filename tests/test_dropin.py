"""FastMNISTLoader in training code written for ``DataLoader``: loops in the style of the
well-known public MNIST examples, with only the lines that build the loaders swapped, print
exactly what they print with torchvision + DataLoader."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from fastmnist import FastMNISTLoader

from .conftest import seed_pipeline

LOG_INTERVAL = 10


def train(model, device, train_loader, optimizer, epoch, log):
    """One epoch, as the PyTorch MNIST example's ``train`` is written."""
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        if batch_idx % LOG_INTERVAL == 0:
            log("Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}".format(  # noqa: UP032 (as the example)
                epoch, batch_idx * len(data), len(train_loader.dataset),
                100. * batch_idx / len(train_loader), loss.item()))


def test(model, device, test_loader, log):
    """Evaluation, as the PyTorch MNIST example's ``test`` is written."""
    model.eval()
    test_loss = 0
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    test_loss /= len(test_loader.dataset)
    log("\nTest set: Average loss: {:.4f}, Accuracy: {}/{} ({:.0f}%)\n".format(  # noqa: UP032
        test_loss, correct, len(test_loader.dataset), 100. * correct / len(test_loader.dataset)))


test.__test__ = False  # the example's name, not a pytest test


def run_example(train_loader, test_loader) -> list[str]:
    """The example's main loop (a linear model, to keep it quick): its printed lines."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(dim=1))
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    lines = []
    for epoch in range(1, 3):
        train(model, "cpu", train_loader, optimizer, epoch, lines.append)
        test(model, "cpu", test_loader, lines.append)
    return lines


def test_the_mnist_example_prints_the_same_lines(real_shards, torchvision_test_root):
    # the real digits are the test split; train on them in file order so both runs see the
    # same batches (shuffled runs differ only as two shuffles do)
    reference = run_example(seed_pipeline(torchvision_test_root, batch_size=64),
                            seed_pipeline(torchvision_test_root, batch_size=1000))
    swapped = run_example(FastMNISTLoader(real_shards, split="test", batch_size=64, shuffle=False),
                          FastMNISTLoader(real_shards, split="test", batch_size=1000, shuffle=False))
    assert len(reference) == 2 * (16 + 1)
    assert swapped == reference  # losses, counts, percentages: bit for bit


def test_dataset_and_attributes_mean_what_dataloaders_do(real_shards, torchvision_test_root):
    reference = seed_pipeline(torchvision_test_root, batch_size=100)
    loader = FastMNISTLoader(real_shards, split="test", batch_size=100, shuffle=False)
    assert len(loader.dataset) == len(reference.dataset) == 10000
    assert (loader.batch_size, loader.drop_last, loader.num_workers) == (100, False, 0)
    for i in (0, 1, 4321, 9999, -1):
        x, label = loader.dataset[i]
        rx, rlabel = reference.dataset[i]
        assert torch.equal(x, rx) and label == rlabel and type(label) is int
    assert torch.equal(loader.dataset.targets, reference.dataset.targets)
    assert sum(1 for _ in zip(range(3), loader.dataset, strict=False)) == 3  # iterable as a Dataset
    uint8 = FastMNISTLoader(real_shards, split="test", images="uint8").dataset[7][0]
    assert torch.equal(uint8, reference.dataset[7][0])


def test_sampler_as_a_distributed_samplers(real_shards, torchvision_test_root):
    """DDP scripts call ``train_loader.sampler.set_epoch(epoch)`` and read ``len(sampler)``."""
    dataset = seed_pipeline(torchvision_test_root).dataset
    for rank in range(3):
        sampler = DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=False)
        reference = DataLoader(dataset, batch_size=128, sampler=sampler)
        loader = FastMNISTLoader(real_shards, split="test", batch_size=128, shuffle=False, rank=rank,
                                 world_size=3)
        assert len(loader.sampler) == len(sampler) == 3334 and len(loader) == len(reference)
        assert list(loader.sampler) == list(sampler)
        for (x, y), (rx, ry) in zip(loader, reference, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    shuffled = FastMNISTLoader(real_shards, split="test", batch_size=500, rank=1, world_size=2)
    epochs = {}
    for epoch in (3, 5, 3):
        shuffled.sampler.set_epoch(epoch)
        planned = list(shuffled.sampler)
        seen = torch.cat([y for _, y in shuffled]).tolist()
        assert seen == reference_labels(real_shards, planned)
        epochs.setdefault(epoch, planned)
        assert planned == epochs[epoch]  # a pure function of the epoch
    assert epochs[3] != epochs[5] and sorted(epochs[3]) != list(range(0, 10000, 2))


def reference_labels(shards, indices):
    targets = FastMNISTLoader(shards, split="test").dataset.targets
    return targets[indices].tolist()
