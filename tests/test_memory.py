"""Conversion in bounded memory: peak resident memory of ``fastmnist convert`` on 60,000 and
on 2,000,000 generated images (npy with float32, and tar shards) stays flat, within 2x."""

import shutil

import pytest

from fastmnist.scale import run_measured
from fastmnist.synth import write_raw


@pytest.fixture
def scratch(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # gigabytes: gone before the next test


@pytest.mark.parametrize("format", ["npy", "wds"])
def test_peak_memory_is_flat_from_60k_to_2m_images(scratch, format):
    peaks = {}
    for n in (60_000, 2_000_000):
        root = scratch / f"raw{n}"
        write_raw(root, n, 1000, compressed=False)
        out = scratch / f"set{n}"
        _, peaks[n] = run_measured("convert", "--root", str(root), "--out", str(out), "--format", format,
                                   "--quiet")
        assert (out / "manifest.json").exists()
        shutil.rmtree(out)
        shutil.rmtree(root)
    print(f"peak RSS of convert ({format}), MiB: {peaks}")
    assert peaks[2_000_000] < 2 * peaks[60_000], peaks
    assert peaks[2_000_000] < 100, "tens of MB, not the 1.5 GB of the images"
