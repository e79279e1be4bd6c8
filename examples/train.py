"""Train the usual small MNIST CNN with either loader and see where the time goes.

    python examples/train.py --loader fast
    python examples/train.py --loader torchvision
    python examples/train.py --loader fast --augment     # the recipe's RandomAffine, either loader

By default it uses the real MNIST test split (../shared/data/mnist-t10k), divided into
8,000 training and 2,000 held-out images, written as a torchvision-layout root and
converted once, so both loaders read the same samples. Prints, per epoch, the seconds
spent waiting for data and computing, and the held-out accuracy. ``--augment`` trains with
``RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1))`` in the usual transform, handed
as it is to either loader; evaluation stays un-augmented.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from fastmnist import FastMNISTLoader, convert  # noqa: E402
from fastmnist.formats.idx import read_images, read_labels, write_idx  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


class Net(nn.Module):
    """The PyTorch MNIST example's CNN: float32 [B,1,28,28] -> log-probabilities [B,10]."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.log_softmax(self.fc2(F.relu(self.fc1(x.flatten(1)))), dim=1)


def prepare(source: Path, work: Path, n_train: int = 8000) -> tuple[Path, Path]:
    """Split the t10k files under ``source`` into train (first ``n_train``) and held-out (the
    rest) in a torchvision root ``work/raw``, and convert it to ``work/shards``."""
    raw = work / "raw" / "MNIST" / "raw"
    images = read_images(source / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")[:, 0]
    labels = read_labels(source / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz")
    for prefix, part in (("train", slice(0, n_train)), ("t10k", slice(n_train, None))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[part])
    convert(work / "raw", work / "shards", progress=False)
    return work / "raw", work / "shards"


def transform(augment: bool):
    """The training transform: the tutorial's, with the recipe's RandomAffine if ``augment``."""
    from torchvision import transforms

    affine = [transforms.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1))] if augment else []
    return transforms.Compose([*affine, transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])


def loaders(kind: str, raw: Path, shards: Path, batch_size: int, seed: int, augment: bool = False):
    """(train loader, held-out loader) of the chosen kind over the same samples."""
    if kind == "fast":
        return (FastMNISTLoader(shards, "train", batch_size, shuffle=True, seed=seed,
                                transform=transform(True) if augment else None),
                FastMNISTLoader(shards, "test", 1000, shuffle=False))
    import torchvision
    from torch.utils.data import DataLoader

    train = torchvision.datasets.MNIST(str(raw), train=True, transform=transform(augment))
    test = torchvision.datasets.MNIST(str(raw), train=False, transform=transform(False))
    return (DataLoader(train, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(test, 1000))


def train(kind: str, raw: Path, shards: Path, epochs: int = 3, batch_size: int = 64,
          lr: float = 1.0, seed: int = 0, log=print, augment: bool = False) -> list[dict]:
    """Train and evaluate; one dict per epoch: loss (first and last 10% of batches),
    data_s, compute_s, accuracy (held-out, 0..1)."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adadelta(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    train_loader, test_loader = loaders(kind, raw, shards, batch_size, seed, augment)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        data_s = compute_s = 0.0
        losses = []
        t = time.perf_counter()
        for x, y in train_loader:
            t1 = time.perf_counter()
            data_s += t1 - t
            opt.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            t = time.perf_counter()
            compute_s += t - t1
        sched.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
        tenth = max(1, len(losses) // 10)
        row = {"epoch": epoch, "loss_first": sum(losses[:tenth]) / tenth,
               "loss_last": sum(losses[-tenth:]) / tenth, "data_s": data_s,
               "compute_s": compute_s, "accuracy": correct / total}
        history.append(row)
        name = f"{kind} + RandomAffine" if augment else kind
        log(f"[{name}] epoch {epoch}: loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}, "
            f"waiting for data {data_s:.2f}s, computing {compute_s:.2f}s, "
            f"held-out accuracy {100 * row['accuracy']:.2f}% ({total} images)")
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loader", choices=["fast", "torchvision"], default="fast")
    p.add_argument("--real", type=Path, default=REAL, help="root holding MNIST/raw/t10k-*.gz")
    p.add_argument("--work", type=Path, default=Path("results/train"), help="prepared data goes here")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", action="store_true", help="train with the recipe's RandomAffine")
    args = p.parse_args()
    raw, shards = prepare(args.real, args.work)
    train(args.loader, raw, shards, args.epochs, args.batch_size, seed=args.seed, augment=args.augment)


if __name__ == "__main__":
    main()
