"""Conversion time from each input kind, 60,000 images each (the real test digits six
times over when ``../shared/data/mnist-t10k`` is there, else generated ones), beside idx;
and PNG decoding on all cores against one thread, the same images in the same run.

    pytest benchmarks/test_convert_inputs.py --benchmark-only

``extra_info["s_per_10k"]``: the median conversion time per 10,000 images.
"""

import gzip
import statistics
from pathlib import Path

import numpy as np
import pytest

from fastmnist import convert_from
from fastmnist.bench.inputs import png_bytes, write_input
from fastmnist.conversion.synth import generate
from fastmnist.formats.idx import write_idx
from fastmnist.formats.pictures import decode

N = 60000
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k" / "MNIST" / "raw"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    if (REAL / "t10k-images-idx3-ubyte.gz").exists():
        with gzip.open(REAL / "t10k-images-idx3-ubyte.gz") as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(REAL / "t10k-labels-idx1-ubyte.gz") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
        return np.tile(images, (N // len(images), 1, 1)), np.tile(labels, N // len(labels))
    images, labels = generate(N, seed=0)
    return images, labels.astype(np.int64)


@pytest.mark.parametrize("kind", ["idx", "npz", "csv", "hf", "images", "wds"])
def test_convert_60k(benchmark, digits, tmp_path, kind):
    images, labels = digits
    if kind == "idx":
        raw = tmp_path / "in" / "MNIST" / "raw"
        write_idx(raw / "train-images-idx3-ubyte", images)
        write_idx(raw / "train-labels-idx1-ubyte", labels.astype(np.uint8))
        source = tmp_path / "in"
    else:
        source = write_input(kind, tmp_path / "in", images, labels)
    result = benchmark.pedantic(convert_from, args=(source, tmp_path / "out"), rounds=3, iterations=1,
                                kwargs={"kind": kind, "force": True, "progress": False, "split": "train"})
    assert result.manifest.splits["train"].count == N
    benchmark.extra_info["s_per_10k"] = statistics.median(benchmark.stats.stats.data) * 10000 / N


@pytest.mark.parametrize("workers", [1, None], ids=["one process", "one per core"])
def test_decode_60k_pngs(benchmark, digits, workers):
    pngs = png_bytes(digits[0])
    out = benchmark.pedantic(decode, args=(pngs, "", str), kwargs={"workers": workers}, rounds=3,
                             iterations=1)
    assert np.array_equal(out, digits[0])
    benchmark.extra_info["s_per_10k"] = statistics.median(benchmark.stats.stats.data) * 10000 / N
