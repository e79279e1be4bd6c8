"""The scale benchmark's pieces: the shuffle-quality measure against orders whose mixing is
known, and a small run of ``fastmnist scale`` end to end (its figures live in the README)."""

import json

import numpy as np
import pytest

from fastmnist.bench.scale import label_mixing, markdown_row
from fastmnist.cli import main
from fastmnist.loading.order import block_order, epoch_order


def test_label_mixing_tells_sorted_from_shuffled():
    labels = np.repeat(np.arange(10), 6000)  # a set stored sorted by class
    # unshuffled, each batch of 256 holds one class (two at a class boundary): distance ~0.9
    assert label_mixing(labels, 256, 10) == pytest.approx(0.9, abs=0.01)
    shuffled = label_mixing(labels[epoch_order(60000, 0, 0, True).numpy()], 256, 10)
    assert 0.05 < shuffled < 0.1  # what sampling 256 of 10 equal classes gives
    # blocks of 4096 in windows of 8 (32,768 samples, about half the set): in between
    local = label_mixing(labels[block_order(60000, 0, 0, True, 4096).numpy()], 256, 10)
    assert shuffled < local < 0.9
    assert label_mixing(np.zeros(1024, np.int64), 256, 10) == 0.0  # one class: every batch is the set


def test_scale_command_writes_its_table_json_and_chart(tmp_path, capsys):
    out = tmp_path / "docs"
    assert main(["scale", "--work", str(tmp_path / "work"), "--out", str(out), "--sizes", "3000,12000",
                 "--rounds", "1"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "scale.json").read_text())
    rows = result["rows"]
    assert [r["n"] for r in rows] == [3000, 12000]
    for r in rows:
        assert r["source"] == "float32" and r["convert_s"] > 0 and 0 < r["convert_peak_mib"] < 200
        assert r["warm_samples_per_s"] > 0 and r["cold_random"]["samples_per_s"] > 0
        assert r["cold_locality"]["samples_per_s"] > 0 and r["cold_random"]["first_batch_ms"] > 0
        quality = r["shuffle_quality"]
        assert quality["sorted_unshuffled"] > 0.8 and quality["sorted_random"] < 0.2
        assert f"| {r['n']:,} | float32 |" in printed
    # the row printed as its size is done is the final table's: ratios to the first size
    assert printed.count(markdown_row(rows[1], rows[0])) == 2
    assert (out / "scale.png").stat().st_size > 10_000
    assert not any((tmp_path / "work").iterdir()), "every size's files are deleted after it"
