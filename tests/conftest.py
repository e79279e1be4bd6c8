"""Shared fixtures: the real MNIST test split, generated sets, and IDX writing helpers."""

import contextlib
import functools
import gzip
import http.server
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmnist import convert
from fastmnist.conversion.synth import write_raw
from fastmnist.formats.idx import write_idx

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N workers share the cores, not N x all of them
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))

HANG_S = 300  # a test running longer fails (pytest-timeout): a hang costs 5 minutes, not CI's 90


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(HANG_S))


def pytest_report_header() -> str:
    """The CPU kernels torch dispatches to here: bilinear resampling's last bits depend on them
    (tests/test_augment.py runs its torchvision comparisons on the default kernels too)."""
    return f"torch {torch.__version__}, cpu capability: {torch.backends.cpu.get_cpu_capability()}"


REAL_ROOT = Path(os.environ.get(
    "FASTMNIST_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"))


def write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray, folder="MNIST"):
    """Write one split's two raw files, uncompressed, under ``root/<folder>/raw``."""
    prefix = "train" if split == "train" else "t10k"
    raw = root / folder / "raw"
    return (write_idx(raw / f"{prefix}-images-idx3-ubyte", images),
            write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels))


INDEXED_N = 1003  # train samples of the indexed sets: prime, so no world or batch size divides it


def indexed_images(n: int) -> np.ndarray:
    """uint8 ``(n, 28, 28)`` whose first two pixels encode the sample index (for exactly-once)."""
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    return images


def decode_indices(x) -> list[int]:
    """Sample indices from a uint8 batch of ``indexed_images``."""
    return (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist()


def batch_indices(batches) -> list[list[int]]:
    """The sample indices of an epoch of ``(x, y)`` uint8 batches of an indexed set, batch
    by batch (``normalize=False``)."""
    return [decode_indices(x) for x, _ in batches]


def seed_pipeline(root, batch_size=64):
    """The tutorial pipeline over the test split under ``root``, unshuffled: the reference."""
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = torchvision.datasets.MNIST(root, train=False, transform=tf)
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real MNIST test split (torchvision layout); required in CI, else skipped."""
    if not (REAL_ROOT / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists():
        message = f"real MNIST test split not found at {REAL_ROOT}"
        if os.environ.get("CI"):
            pytest.fail(message + " (required when CI is set)")
        pytest.skip(message)
    return REAL_ROOT


@pytest.fixture(scope="session")
def torchvision_test_root(real_root, tmp_path_factory) -> Path:
    """The real test split laid out so ``torchvision.datasets.MNIST(train=False)`` opens it:
    extracted t10k files plus empty train placeholders (torchvision checks all four exist)."""
    root = tmp_path_factory.mktemp("tv")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(real_root / "MNIST" / "raw" / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    write_split(root, "train", np.zeros((0, 28, 28)), np.zeros(0))
    return root


@pytest.fixture(scope="session")
def real_shards(real_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "shards"
    convert(real_root, out, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Generated 60,000/10,000 raw files in torchvision's layout."""
    root = tmp_path_factory.mktemp("synth")
    write_raw(root)
    return root


@pytest.fixture(scope="session")
def synth_shards(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_out") / "shards"
    convert(synth_root, out, format="both", progress=False)
    return out


@pytest.fixture(scope="session")
def indexed_shards(tmp_path_factory) -> Path:
    """A set whose images encode their index: train ``INDEXED_N`` samples, test 10."""
    root = tmp_path_factory.mktemp("indexed")
    write_split(root, "train", indexed_images(INDEXED_N), np.arange(INDEXED_N) % 10)
    write_split(root, "test", indexed_images(10), np.arange(10) % 10)
    out = root / "shards"
    convert(root, out, progress=False)
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requested = None  # a list each GET's path is appended to, where served is given one

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.requested is not None:
            self.requested.append(self.path)
        super().do_GET()


@contextlib.contextmanager
def served(directory, requested: list | None = None):
    """``directory`` served by a real HTTP server on 127.0.0.1 (threads of this process);
    yields its base URL, ending in "/". ``requested``: a list each GET's path is appended to."""
    handler = functools.partial(type("Handler", (_QuietHandler,), {"requested": requested}),
                                directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
