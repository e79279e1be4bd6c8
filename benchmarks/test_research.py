"""Federated clients and task streams against the plain loader, interleaved in one run
(medians of rounds, samples/s): a client of 100 Dirichlet(0.3) clients, a SplitMNIST task
(classes 0 and 1), a PermutedMNIST task; and the bare reference a permuted task shares its
bottleneck with (the plain loader's batches with their pixels reordered by ``index_select``,
outside the loader); a RotatedMNIST task beside the augmentation path it runs on (a plain
loader with ``RandomRotation(30)``). Also the time to draw 1,000 Dirichlet clients of 60,000 samples.

    pytest benchmarks/test_research.py --benchmark-only -s
"""

import statistics
import time

import numpy as np
import pytest
from torchvision import transforms

from fastmnist import FastMNISTLoader, open_shards, partition
from fastmnist.tasks import permuted_tasks, rotated_tasks, split_tasks, task_permutation

ROUNDS = 7
BATCH = 64


def _rate(loader, epochs: int, each=None) -> float:
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for x, y in loader:
            if each is not None:
                x = each(x)
            n += len(y)
    return n / (time.perf_counter() - start)


def test_clients_and_tasks_against_the_plain_loader(benchmark, bench_data):
    shards = bench_data[1]
    clients = partition(shards, 100, "dirichlet", alpha=0.3, min_partition_size=0, seed=42)
    client = max(range(100), key=lambda i: -abs(len(clients[i]) - 600))  # a client of about 600 samples
    perm = task_permutation(0, 1)
    info = open_shards(shards).split("train").info
    rotate = transforms.Compose([transforms.RandomRotation(30), transforms.ToTensor(),
                                 transforms.Normalize((info.mean,), (info.std,))])
    loaders = {"plain": (FastMNISTLoader(shards, batch_size=BATCH), 1, None),
               "client": (clients.loader(client, batch_size=BATCH), max(1, 60000 // len(clients[client])),
                          None),
               "split task": (split_tasks(shards, [[0, 1]], batch_size=BATCH).loader(0), 5, None),
               "permuted task": (permuted_tasks(shards, 2, batch_size=BATCH).loader(1), 1, None),
               "plain + bare permute": (FastMNISTLoader(shards, batch_size=BATCH), 1,
                                        lambda x: x.flatten(1).index_select(1, perm).view_as(x)),
               "rotated task": (rotated_tasks(shards, [0.0, 30.0], batch_size=BATCH).loader(1), 1, None),
               "plain + RandomRotation(30)": (FastMNISTLoader(shards, batch_size=BATCH, transform=rotate), 1,
                                              None)}
    rates = {name: [] for name in loaders}

    def rounds():
        for _ in range(ROUNDS):
            for name, (loader, epochs, each) in loaders.items():
                rates[name].append(_rate(loader, epochs, each))

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    plain = statistics.median(rates["plain"])
    for name, values in rates.items():
        median = statistics.median(values)
        benchmark.extra_info[name] = {"samples_per_s": round(median), "spread": [round(min(values)),
                                      round(max(values))], "of_plain": round(median / plain, 3)}
        print(f"{name:>22}: {median:>10,.0f} samples/s (min {min(values):,.0f}, max {max(values):,.0f}), "
              f"{median / plain:.2f} of plain")
    benchmark.extra_info["permuted_of_bare_permute"] = round(
        statistics.median(rates["permuted task"]) / statistics.median(rates["plain + bare permute"]), 3)


@pytest.mark.parametrize("clients", [100, 1000])
def test_dirichlet_partition_of_60k(benchmark, bench_data, clients):
    labels = np.asarray(open_shards(bench_data[1]).split("train").array("labels"))
    made = benchmark(partition, labels, clients, "dirichlet", alpha=0.3, min_partition_size=0, seed=42)
    assert sum(map(len, made.clients)) == len(labels)
