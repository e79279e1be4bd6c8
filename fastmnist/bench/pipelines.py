"""Throughput of FastMNISTLoader against the usual pipelines, over one full epoch per round.

Each pipeline is a factory ``(batch_size) -> iterable``, each pass over which is one
shuffled epoch of ``(x, y)`` batches: float32
``[B,1,28,28]`` images and int64 ``[B]`` labels; :func:`measure` times it. Used by
``fastmnist bench`` (the report) and by ``benchmarks/`` (pytest-benchmark).
"""

import atexit
import functools
import importlib.util
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from ..loader import FastMNISTLoader
from ..remote.transport import Retry
from ..store import open_shards, sha256_file

SEED = "seed pipeline, workers=0"  # the reference every ratio is taken against
COUNTED = "index_select dataset (state: one counter)"  # see _CountedBatches
# the fault row's retries: 0.5 s read timeout (the server stalls once for 1 s), short backoff
FAST_RETRY = Retry(attempts=30, total_s=60, timeout_s=0.5, backoff_s=0.005)
FLOOR = "index_select floor"
# the selection rows: a subset, a class-balanced weighted draw, a two-part mixture (train + test)
SUBSET, BALANCED = "fastmnist subset (50,000 indices)", "fastmnist class-balanced (weighted draws)"
MIXTURE = "fastmnist mixture (train + test splits)"
# the augmentation rows (measured at the report's first batch size only): the recipe's RandomAffine
AFFINE = dict(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
SEED_AFFINE = "seed pipeline + RandomAffine, workers=0"
FAST_AFFINE = "fastmnist + RandomAffine (nearest)"


def pipelines(raw_root: Path, shards: Path, cuda: bool | None = None
              ) -> dict[str, Callable[[int], Iterable]]:
    """Name -> ``factory(batch_size)`` of one epoch over the train split of ``shards``
    (converted from the raw files under ``raw_root``)."""
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision import transforms

    split = open_shards(shards).split("train")
    mean, std = split.mean, split.std
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    ram_x = torch.from_numpy(split.array("images_f32", mode="c")).clone()  # in-RAM copies
    ram_y = torch.from_numpy(split.array("labels", mode="c")).clone()

    def seed(workers, bs, pin=False, transform=tf):
        return DataLoader(torchvision.datasets.MNIST(str(raw_root), train=True, transform=transform),
                          batch_size=bs, shuffle=True, num_workers=workers, pin_memory=pin)

    def floor(bs):
        order = torch.randperm(len(ram_y))
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            yield ram_x.index_select(0, idx), ram_y.index_select(0, idx)

    found = {
        SEED: lambda bs: seed(0, bs),
        "seed pipeline, workers=2": lambda bs: seed(2, bs),
        "TensorDataset + DataLoader": lambda bs: DataLoader(TensorDataset(ram_x, ram_y),
                                                            batch_size=bs, shuffle=True),
        FLOOR: lambda bs: _Epochs(floor, bs),
        "fastmnist float32": lambda bs: FastMNISTLoader(shards, batch_size=bs),
        "fastmnist uint8": lambda bs: FastMNISTLoader(shards, batch_size=bs, images="uint8"),
        SUBSET: lambda bs: FastMNISTLoader(shards, batch_size=bs, indices=range(0, 50_000)),
        BALANCED: lambda bs: FastMNISTLoader(shards, batch_size=bs, balanced=True),
        MIXTURE: lambda bs: FastMNISTLoader(shards, batch_size=bs, mix_with=[(shards, "test")]),
    }
    found.update(_augmented(shards, mean, std, seed))
    for stateful in (False, True):  # torchdata's cost on its own, beside the loader's rows
        found[f"{COUNTED} in {'Stateful' if stateful else ''}DataLoader, workers=2"] = (
            lambda bs, s=stateful: _Epochs(_counted_through_workers, ram_x, ram_y, bs, s))
    for workers, sharing, snapshots in ((1, "file_descriptor", None), (2, "file_descriptor", None),
                                        (2, "file_system", None), (2, "file_descriptor", 1),
                                        (2, "file_descriptor", 64)):
        name = (f"fastmnist in {'Stateful' if snapshots else ''}DataLoader, workers={workers}"
                + (", file_system sharing" if sharing == "file_system" else "")
                + (f", snapshot every {snapshots} steps" if snapshots and snapshots > 1 else ""))
        found[name] = lambda bs, w=workers, how=sharing, every=snapshots: _Epochs(
            _through_workers, shards, bs, w, how, every)
    if "wds" in split.formats:
        shard_urls = [str(split.path(s.file)) for s in split.shards]
        found["stock webdataset"] = lambda bs: _Epochs(_stock_webdataset, shard_urls, bs, mean, std)
        found["fastmnist wds local"] = lambda bs: FastMNISTLoader(shards, batch_size=bs,
                                                                  format="wds")
        found["fastmnist wds over HTTP"] = lambda bs: FastMNISTLoader(
            _served(shards), batch_size=bs)
        found["fastmnist wds over HTTP, faults injected"] = lambda bs: FastMNISTLoader(
            _served(shards, faulty=True), batch_size=bs, retry=FAST_RETRY)
        if importlib.util.find_spec("moto") and importlib.util.find_spec("s3fs"):
            found["fastmnist wds over S3 (local moto server)"] = lambda bs: FastMNISTLoader(
                _in_s3(shards).url, batch_size=bs, storage_options=_in_s3(shards).options)
    if torch.cuda.is_available() if cuda is None else cuda:
        found["fastmnist cuda pinned"] = lambda bs: _Epochs(_synced, FastMNISTLoader(
            shards, batch_size=bs, device="cuda"))
        found["fastmnist cuda resident"] = lambda bs: _Epochs(_synced, FastMNISTLoader(
            shards, batch_size=bs, device="cuda", resident=True))
        found["seed pipeline to cuda, workers=2"] = lambda bs: _Epochs(
            _to_cuda, seed(2, bs, pin=True))
    return found


def augmented(name: str) -> bool:
    """Whether pipeline ``name`` is one of the augmentation rows."""
    return "RandomAffine" in name or "Elastic" in name


def _augmented(shards: Path, mean: float, std: float, seed) -> dict:
    """The augmentation rows (``seed(workers, batch_size, transform)`` makes the seed
    pipeline): the seed pipeline with the recipe's ``RandomAffine`` (PIL, per sample),
    FastMNISTLoader with the same transform (nearest and bilinear) and with
    ``ElasticTransform``, and kornia's batched ``RandomAffine`` on the loader's batches
    when kornia is installed."""
    from torchvision import transforms

    def recipe(*steps):
        return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize((mean,), (std,))])

    affine = recipe(transforms.RandomAffine(**AFFINE))
    bilinear = recipe(transforms.RandomAffine(**AFFINE, interpolation=transforms.InterpolationMode.BILINEAR))
    found = {
        SEED_AFFINE: lambda bs: seed(0, bs, transform=affine),
        "seed pipeline + RandomAffine, workers=2": lambda bs: seed(2, bs, transform=affine),
        FAST_AFFINE: lambda bs: FastMNISTLoader(shards, batch_size=bs, transform=affine),
        "fastmnist + RandomAffine (bilinear)": lambda bs: FastMNISTLoader(shards, batch_size=bs,
                                                                          transform=bilinear),
        "fastmnist + ElasticTransform (bilinear)": lambda bs: FastMNISTLoader(
            shards, batch_size=bs, transform=recipe(transforms.ElasticTransform(alpha=34.0, sigma=4.0))),
    }
    if importlib.util.find_spec("kornia"):
        found["kornia RandomAffine (batched) on fastmnist batches"] = lambda bs: _Epochs(
            _kornia_affine, shards, bs)
    return found


def _kornia_affine(shards: Path, batch_size: int):
    """kornia's batched ``RandomAffine`` (its own per-sample draws, nearest) on each float32
    batch of FastMNISTLoader."""
    import kornia.augmentation

    affine = kornia.augmentation.RandomAffine(**AFFINE, resample="nearest", p=1.0)
    with torch.no_grad():
        for x, y in FastMNISTLoader(shards, batch_size=batch_size):
            yield affine(x), y


def _stock_webdataset(urls: list[str], batch_size: int, mean: float, std: float):
    """webdataset's usual pipeline over the same shards, normalised to float32 per batch."""
    import webdataset

    from ..formats.normalize import normalize_u8

    dataset = (webdataset.WebDataset(urls, shardshuffle=len(urls)).shuffle(1000).decode()
               .to_tuple("npy", "cls").batched(batch_size))
    for images, labels in dataset:
        yield (normalize_u8(torch.from_numpy(images)[:, None], mean, std),
               torch.as_tensor(labels, dtype=torch.int64))


def _through_workers(shards: Path, batch_size: int, workers: int, sharing: str, snapshots: int | None):
    """One epoch of FastMNISTLoader wrapped as ``DataLoader(loader, batch_size=None,
    num_workers=workers)`` (torchdata's ``StatefulDataLoader`` snapshotting every
    ``snapshots`` steps, unless None), batches crossing from the workers by the ``sharing``
    strategy of torch.multiprocessing; the loader's warning about workers silenced."""
    import torch.multiprocessing
    from torch.utils.data import DataLoader

    loader, options = FastMNISTLoader(shards, batch_size=batch_size), {}
    if snapshots:
        from torchdata.stateful_dataloader import StatefulDataLoader as DataLoader

        options = {"snapshot_every_n_steps": snapshots}
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy(sharing)
    try:
        with warnings.catch_warnings():  # workers are forked with this filter
            warnings.simplefilter("ignore")
            yield from DataLoader(loader, batch_size=None, num_workers=workers, **options)
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


class _CountedBatches(torch.utils.data.IterableDataset):
    """The floor's loop as a dataset for DataLoader workers, whose state is one counter: what
    torchdata's ``StatefulDataLoader`` costs with the cheapest state there is. Worker ``w``
    of ``k`` takes batches ``w, w + k, ...`` of one fixed permutation, from batch ``done``
    (the counter: batches of the epoch started, as the last worker to snapshot saw it)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size, self.done = x, y, batch_size, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, w = (1, 0) if info is None else (info.num_workers, info.id)
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(0))
        size, start, self.done = self.batch_size, self.done, 0
        for b in range(start + w, -(-len(order) // size), k):
            self.done = b + 1
            idx = order[b * size:(b + 1) * size]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]


def _counted_through_workers(x: torch.Tensor, y: torch.Tensor, batch_size: int, stateful: bool):
    """One epoch of :class:`_CountedBatches` over ``x``/``y`` in ``DataLoader(...,
    batch_size=None, num_workers=2)``, or torchdata's ``StatefulDataLoader`` (snapshotting
    every step, its default) if ``stateful``."""
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader as DataLoader
    else:
        from torch.utils.data import DataLoader
    yield from DataLoader(_CountedBatches(x, y, batch_size), batch_size=None, num_workers=2)


def state_dict_cost(shards: Path, calls: int = 2000) -> dict:
    """Microseconds per ``state_dict()`` of a loader mid-epoch (after 300 batches of 64), over
    the train split of ``shards`` and over a 6,000,000-sample set of sparse files (right
    sizes, zero bytes: the state never reads the data), median of ``calls``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        big = sparse_set(Path(tmp), 6_000_000)
        out = {}
        for name, path, kwargs in (("60k", shards, {}), ("6M", big, {"normalize": False})):
            loader = FastMNISTLoader(path, batch_size=64, **kwargs)
            it = iter(loader)
            for _ in range(300):
                next(it)
            loader.state_dict()
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                loader.state_dict()
                times.append(time.perf_counter() - t)
            out[name] = {"samples": loader.info.count, "state_dict_us": statistics.median(times) * 1e6}
        return out


def holdout_cost(shards: Path, rounds: int = 20) -> float:
    """Milliseconds ``fastmnist.holdout`` takes to split the train split of ``shards`` into a
    stratified 11/12 and 1/12 (Lightning's 55,000/5,000 of MNIST), median of ``rounds``,
    from the labels in memory."""
    from ..loading.select import holdout

    labels = open_shards(shards).split("train").array("labels", mode="c").copy()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        holdout(labels, {"train": 11 / 12, "val": 1 / 12})
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def copy_bandwidth(megabytes: int = 256, rounds: int = 5) -> float:
    """Bytes per second one ``copy_`` of a ``megabytes`` tensor moves (each byte read once and
    written once), median of ``rounds``: the memory bandwidth a gather can hope for."""
    src = torch.ones(megabytes << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds + 1):  # the first touches the pages
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return src.numel() / statistics.median(times[1:])


def sparse_set(directory: Path, n: int) -> Path:
    """A set of ``n`` samples (uint8 images and labels, train split) whose files have the
    right headers and sizes but are sparse: zero bytes, nothing written, the images never
    read (their sha256 in the manifest is a placeholder; the labels', which every open
    checks, is theirs)."""
    from ..formats.manifest import MANIFEST, array_file_name, describe, describe_split, npy_header, npy_size

    files = {}
    for array, dtype, shape in (("images_u8", "uint8", (n, 1, 28, 28)), ("labels", "int64", (n,))):
        name = array_file_name("train", array)
        with open(directory / name, "wb") as f:
            f.write(npy_header(dtype, shape))
            f.truncate(npy_size(dtype, shape))
        digest = "0" * 64
        if array == "labels":
            with open(directory / name, "rb") as f:
                digest = sha256_file(f)
        files[array] = {"file": name, "dtype": dtype, "shape": list(shape), "size": npy_size(dtype, shape),
                        "sha256": digest}
    manifest = describe("sparse", True, {}, {}, {"train": describe_split(n, 0.1307, 0.3081, 10, files)})
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


@functools.cache
def _served(directory: Path, faulty: bool = False) -> str:
    """The URL of ``directory`` served on 127.0.0.1 by ``python -m http.server`` (or, if
    ``faulty``, by ``fastmnist.bench.faulty_server``: 20% of responses cut, 10% 503, one 1 s
    stall, its retries logged as deliberate), started once in a subprocess and stopped when
    this process exits."""
    port = _free_port()
    command = ["-m", "fastmnist.bench.faulty_server", str(directory), str(port), "--stall-s", "1"] if faulty \
        else ["-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)]
    _start([sys.executable, *command], f"http://127.0.0.1:{port}/manifest.json")
    url = f"http://127.0.0.1:{port}/"
    if faulty:
        logging.getLogger("fastmnist").addFilter(_Deliberate(url))
    return url


class _Deliberate(logging.Filter):
    """Marks the retry warnings about URLs under ``base`` (the faulty server's) as the faults
    the benchmark injects on purpose."""

    def __init__(self, base: str):
        super().__init__()
        self.base = base

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and str(record.args[0]).startswith(self.base):
            record.msg = "DELIBERATE fault injected by the benchmark, retried as it should be: " + record.msg
        return True


@functools.cache
def _in_s3(directory: Path) -> "_Bucket":
    """``directory`` pushed to a bucket of a moto S3 server on 127.0.0.1 (a subprocess,
    stopped when this process exits), made once per process."""
    from ..conversion.push import push

    port = _free_port()
    _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
           f"http://127.0.0.1:{port}/")
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
    import fsspec

    fsspec.filesystem("s3", **options).mkdir("fastmnist-bench")
    push(directory, "s3://fastmnist-bench/set/", options, progress=False)
    return _Bucket("s3://fastmnist-bench/set/", options)


class _Bucket(NamedTuple):
    """A set pushed to the benchmark's S3 server: its URL and the storage options to read it."""

    url: str
    options: dict


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], ready_url: str) -> None:
    """Start a server ``command`` (terminated when this process exits); wait until
    ``ready_url`` answers."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(server.terminate)
    for _ in range(200):
        try:
            urllib.request.urlopen(ready_url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{' '.join(command)}: did not start")


class _Epochs:
    """Re-iterable: each ``iter()`` is a fresh epoch from ``make(*args)``, a generator."""

    def __init__(self, make, *args):
        self.make, self.args = make, args

    def __iter__(self):
        return iter(self.make(*self.args))


def _synced(batches):
    """Yield from ``batches``, then wait for the GPU, so timings include the last copy."""
    yield from batches
    torch.cuda.synchronize()


def _to_cuda(loader):
    """The seed pipeline moved to the GPU as its users do (pinned, ``non_blocking``), timed
    to the last copy like ``_synced``."""
    yield from _synced((x.cuda(non_blocking=True), y.cuda(non_blocking=True)) for x, y in loader)


def run_epoch(pipeline: Iterable) -> int:
    """Consume one epoch of ``pipeline``; the number of samples seen."""
    return sum(len(y) for _, y in pipeline)


def run_round(pipeline: Iterable, seconds: float | None, at_least: float = 0.0) -> tuple[int, float, bool]:
    """Whole epochs of ``pipeline`` until ``at_least`` seconds have passed (one, at least),
    the last stopped after the batch that ends ``seconds`` (None: never): the samples seen,
    the seconds they took, and whether an epoch was stopped early. Workers shut down after
    the clock stops."""
    samples, start = 0, time.perf_counter()
    while True:
        batches = iter(pipeline)
        for _, y in batches:
            samples += len(y)
            if seconds is not None and time.perf_counter() - start >= seconds:
                elapsed = time.perf_counter() - start
                del batches  # a DataLoader's workers, a generator's servers: let go, untimed
                return samples, elapsed, True
        if time.perf_counter() - start >= at_least:
            return samples, time.perf_counter() - start, False


def measure(factory: Callable[[int], Iterable], batch_size: int, rounds: int, min_seconds: float = 0.0
            ) -> dict:
    """Time from construction to the first batch, then the median samples/s over full epochs
    of the pipeline built once: ``rounds`` of them, more while they add up to less than
    ``min_seconds`` (a fast pipeline's median then rests on more than a few milliseconds of
    a noisy machine); and its peak extra resident memory."""
    start = time.perf_counter()
    pipeline = factory(batch_size)
    next(iter(pipeline))
    first_batch_s = time.perf_counter() - start
    seconds, samples = [], 0
    with PeakRSS() as rss:
        while len(seconds) < rounds or sum(seconds) < min_seconds:
            t = time.perf_counter()
            samples = run_epoch(pipeline)
            seconds.append(time.perf_counter() - t)
    median = statistics.median(seconds)
    return {"samples": samples, "rounds": len(seconds), "seconds": seconds, "median_s": median,
            "samples_per_s": samples / median, "first_batch_ms": first_batch_s * 1e3,
            "peak_extra_mb": rss.peak_extra / 1e6}


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS every 5 ms in a thread; ``peak_extra`` above the start."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.peak_extra = self.peak - self.base
