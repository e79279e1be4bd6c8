"""The benchmark report (short mode, as the main job runs it): files written and consistent,
every round whole epochs or cut after its seconds, and the fastmnist ratios pass the
regression gate."""

import copy
import json
import time
from pathlib import Path

import pytest

from fastmnist.bench.pipelines import (
    BALANCED,
    COUNTED,
    FAST_AFFINE,
    FLOOR,
    MIXTURE,
    SEED,
    SEED_AFFINE,
    SUBSET,
)
from fastmnist.bench.report import check, interleaved, markdown, reference_from, run_report, warnings_of

REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "reference.json"


@pytest.fixture(scope="module")
def quick_report(synth_root, synth_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = run_report(synth_root, synth_shards, out, batch_sizes=(64,), rounds=5, seed_rounds=1,
                        memory_epochs=3, progress=False, round_seconds=1.0)
    return out, result


def test_report_files_agree_with_the_run(quick_report):
    out, result = quick_report
    assert json.loads((out / "bench.json").read_text()) == result
    names = [r["pipeline"] for r in result["rows"]]
    assert {SEED, FLOOR, "TensorDataset + DataLoader", "fastmnist float32", "fastmnist uint8",
            "stock webdataset", "fastmnist wds local", "fastmnist wds over HTTP",
            "fastmnist in DataLoader, workers=1", "fastmnist in DataLoader, workers=2",
            "fastmnist in DataLoader, workers=2, file_system sharing",
            "fastmnist in StatefulDataLoader, workers=2",
            "fastmnist in StatefulDataLoader, workers=2, snapshot every 64 steps",
            f"{COUNTED} in DataLoader, workers=2",
            f"{COUNTED} in StatefulDataLoader, workers=2", SEED_AFFINE, FAST_AFFINE,
            "seed pipeline + RandomAffine, workers=2", "fastmnist + RandomAffine (bilinear)",
            "fastmnist + ElasticTransform (bilinear)", SUBSET, BALANCED, MIXTURE} <= set(names)
    for r in result["rows"]:  # a round lasts at least 0.25 s of whole epochs, or its second when cut
        assert all(t >= 0.25 for t in r["seconds"]) and (not r["cut"] or max(r["seconds"]) >= 1.0)
        if r["pipeline"] in (FLOOR, "fastmnist float32"):
            assert all(n % 60000 == 0 for n in r["samples"]) and not r["cut"]
    assert next(r for r in result["rows"] if r["pipeline"] == SEED)["cut"]  # ~10k samples/s here
    seed = next(r for r in result["rows"] if r["pipeline"] == SEED)
    assert seed["x_seed"] == 1.0
    markdown = (out / "bench.md").read_text()
    for r in result["rows"]:
        row = f"| 64 | {r['pipeline']} | {r['samples_per_s']:,.0f} | {r['spread']:.0%} | {r['x_seed']:.1f} |"
        assert row in markdown and markdown.split(row)[1].split("\n")[0].endswith(
            f" {r['rounds']}{'*' if r['cut'] else ''} |")
    assert "a round is shuffled epochs for at least 0.25 s, the last stopped after 1 s (rounds column: *)" \
        in markdown
    conversion = result["conversion"]
    for format in ("npy", "both"):
        assert f"{conversion[format]['seconds']:.2f} s = {conversion[format]['fraction_of_seed_epoch']:.3f}" \
            in markdown
    assert f"`fastmnist --help`): {conversion['cli_help_s']:.2f} s" in markdown
    states = result["state_dict"]
    assert [v["samples"] for v in states.values()] == [60000, 6_000_000]
    assert f"{states['6M']['state_dict_us']:.1f} us at 6,000,000 samples" in markdown
    assert "Batch 64: StatefulDataLoader(num_workers=2) runs at " in markdown
    assert "every 64 steps; over an index_select dataset whose state is one counter, " in markdown
    assert "Batch 64: FastMNISTLoader with the recipe's RandomAffine (nearest) runs at " in markdown
    assert "Batch 64: choosing samples, as a fraction of the plain loader: a 50,000-sample subset" in markdown
    assert f"a stratified hold-out of the train split takes {result['holdout_ms']:.1f} ms" in markdown
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert len(result["memory"]["rss_mb_after_each"]) == 3


def test_regression_gate_passes_against_the_committed_reference(quick_report):
    _, result = quick_report
    assert check(result, json.loads(REFERENCE.read_text())) == []


def test_gate_flags_a_ratio_below_tolerance(quick_report):
    result = copy.deepcopy(quick_report[1])
    for r in result["rows"]:
        r["floor_unsteady"] = False  # as on a quiet machine: every ratio is judged
    reference = reference_from(result, tolerance=0.5)
    assert check(result, reference) == []
    reference["ratios"]["64"]["fastmnist float32"]["of_floor"] = 1e6
    failures = check(result, reference)
    assert len(failures) == 1 and "batch 64 fastmnist float32: of_floor" in failures[0]
    assert "more than 50% below the reference" in failures[0]


def test_an_unsteady_floor_is_warned_about_and_not_judged(quick_report):
    """A floor whose rounds spread over 25%: a warning in the table and on the chart, no
    'of floor' ratio printed, and the gate does not judge those rows."""
    result = copy.deepcopy(quick_report[1])
    floor = next(r for r in result["rows"] if r["pipeline"] == FLOOR)
    floor["spread"] = 0.4
    for r in result["rows"]:
        r["floor_unsteady"] = True
    warned = warnings_of(result)
    assert warned[0].startswith("batch 64: the floor's rounds spread 40%")
    table = markdown(result)
    assert f"**WARNING** {warned[0]}." in table and "n/a (floor unsteady)" in table
    reference = reference_from(result, tolerance=0.5)
    reference["ratios"]["64"]["fastmnist float32"]["of_floor"] = 1e6
    assert check(result, reference) == []


def test_a_ratio_above_the_copy_bandwidth_is_not_printed(quick_report):
    result = copy.deepcopy(quick_report[1])
    row = next(r for r in result["rows"] if r["pipeline"] == "fastmnist float32")
    row["of_copy_bandwidth"] = 2.24
    assert any("2.24 of this machine's copy bandwidth is impossible" in w for w in warnings_of(result))
    assert "fastmnist float32 gathers" not in markdown(result)


def test_rounds_are_interleaved_and_spread_reported():
    """Each round runs one epoch of every pipeline still short of its count, in turn."""
    log = []

    def pipeline(name, epochs):
        class Epochs:
            def __iter__(self):
                log.append(name)
                return iter([(None, [0] * 10)] * epochs)
        return lambda bs: Epochs()

    rows = interleaved({"a": pipeline("a", 1), "b": pipeline("b", 2)}, 64, {"a": 3, "b": 2}, 0.0)
    assert log == ["a", "b", "a", "b", "a", "b", "a"]  # first batches, then rounds
    assert [r["rounds"] for r in rows] == [3, 2] and [r["samples"] for r in rows] == [[10] * 3, [20] * 2]
    assert all(r["spread"] >= 0 and not r["cut"] for r in rows)


def test_a_round_is_cut_after_its_seconds_and_rated_on_what_it_saw():
    """A slow epoch (20 ms a batch of 10, 50 batches) is stopped after the batch that ends
    0.2 s: about 100 samples, rated near 500/s; a quick one runs whole."""
    def slow(bs):
        class Epochs:
            def __iter__(self):
                for _ in range(50):
                    time.sleep(0.02)
                    yield None, [0] * 10
        return Epochs()

    rows = interleaved({"slow": slow, "quick": lambda bs: [(None, [0] * 10)] * 3}, 64,
                       {"slow": 2, "quick": 2}, 0.0, round_seconds=0.2)
    slow_row, quick_row = rows
    assert slow_row["cut"] and all(80 <= n <= 120 for n in slow_row["samples"])
    assert all(t >= 0.2 for t in slow_row["seconds"]) and 350 < slow_row["samples_per_s"] <= 500
    assert not quick_row["cut"] and quick_row["samples"] == [30, 30]
