"""Benchmark data: FASTMNIST_BENCH_SHARDS / FASTMNIST_BENCH_ROOT when set, else a generated
60,000/10,000 set built once per session."""

import os
from pathlib import Path

import pytest

from fastmnist import convert
from fastmnist.bench.pipelines import pipelines
from fastmnist.bench.report import extract_for_torchvision
from fastmnist.conversion.synth import write_raw


@pytest.fixture(scope="session")
def bench_data(tmp_path_factory) -> tuple[Path, Path]:
    """(raw root, converted shards) of the same data."""
    root = os.environ.get("FASTMNIST_BENCH_ROOT")
    shards = os.environ.get("FASTMNIST_BENCH_SHARDS")
    if root is None:
        root = tmp_path_factory.mktemp("bench_raw")
        write_raw(root)
    root = Path(root)
    extract_for_torchvision(root)
    if shards is None:
        shards = tmp_path_factory.mktemp("bench_shards") / "mnist"
        convert(root, shards, format="both", progress=False)
    return root, Path(shards)


@pytest.fixture(scope="session")
def bench_pipelines(bench_data) -> dict:
    """Name -> factory(batch_size), built once (the in-RAM baselines copy the data)."""
    return pipelines(*bench_data)


@pytest.fixture(scope="session")
def seed_rates() -> dict:
    """batch size -> samples/s of the seed pipeline (workers=0), filled by its benchmark."""
    return {}
