"""Conversion in bounded memory: peak resident memory of ``fastmnist convert`` stays flat,
within 2x and under 100 MiB, from 60,000 generated images to many more. Sizes are chosen so a
case never needs more than about 3 GB of disk at once (raw files plus what convert writes):
uint8 .npy at 2,000,000 images, float32 .npy and tar shards at 500,000 (already 392 MB of
uint8 images, 1.5 GB of float32, that a whole-in-memory conversion would hold)."""

import shutil

import pytest

from fastmnist.bench.scale import run_measured
from fastmnist.conversion.synth import write_raw

CASES = {  # name: (convert options, large size)
    "npy-uint8": (["--format", "npy", "--no-float32"], 2_000_000),
    "npy-float32": (["--format", "npy"], 500_000),
    "wds": (["--format", "wds"], 500_000),
}


@pytest.fixture
def scratch(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # gigabytes: gone before the next test


@pytest.mark.parametrize("case", CASES)
def test_peak_memory_of_convert_is_flat_as_the_set_grows(scratch, case):
    options, large = CASES[case]
    peaks = {}
    for n in (60_000, large):
        root = scratch / f"raw{n}"
        write_raw(root, n, 1000, compressed=False)
        out = scratch / f"set{n}"
        _, peaks[n] = run_measured("convert", "--root", str(root), "--out", str(out), *options, "--quiet")
        assert (out / "manifest.json").exists()
        shutil.rmtree(out)
        shutil.rmtree(root)
    print(f"peak RSS of convert ({case}), MiB: {peaks}")
    assert peaks[large] < 2 * peaks[60_000], peaks
    assert peaks[large] < 100, f"tens of MB, not the {large * 784 / 2**20:.0f} MiB of uint8 images"
