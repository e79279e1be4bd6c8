"""One full shuffled epoch per round for every pipeline at batch 64, 256 and 1024.

    pytest benchmarks/ --benchmark-only

Each benchmark records samples/s and, when the seed pipeline ran first in the same session,
its ratio to it in ``extra_info``. No assertion on time: ratios are reported, not gated here.
"""

import statistics

import pytest
import torch

from fastmnist.bench.pipelines import SEED, run_epoch
from fastmnist.bench.report import SLOW
from fastmnist.store import open_shards

NAMES = [SEED, "seed pipeline, workers=2", "TensorDataset + DataLoader", "index_select floor",
         "fastmnist float32", "fastmnist uint8", "stock webdataset", "fastmnist wds local",
         "fastmnist wds over HTTP", "fastmnist wds over HTTP, faults injected",
         "fastmnist wds over S3 (local moto server)"]
if torch.cuda.is_available():
    NAMES += ["fastmnist cuda pinned", "fastmnist cuda resident", "seed pipeline to cuda, workers=2"]


@pytest.mark.parametrize("batch_size", [64, 256, 1024])
@pytest.mark.parametrize("name", NAMES)
def test_epoch(benchmark, bench_data, bench_pipelines, seed_rates, name, batch_size):
    if name not in bench_pipelines:
        pytest.skip(f"{name}: the benchmark set has no such data (FASTMNIST_BENCH_SHARDS)")
    pipeline = bench_pipelines[name](batch_size)
    slow = name.startswith(SLOW)
    samples = benchmark.pedantic(run_epoch, args=(pipeline,), rounds=2 if slow else 5,
                                 iterations=1, warmup_rounds=0 if slow else 1)
    assert samples == open_shards(bench_data[1]).split("train").count  # one full epoch
    rate = samples / statistics.median(benchmark.stats.stats.data)
    benchmark.extra_info["samples_per_s"] = rate
    if name == SEED:
        seed_rates[batch_size] = rate
    if batch_size in seed_rates:
        benchmark.extra_info["x_seed"] = rate / seed_rates[batch_size]
