"""Federated client partitions of a split: which samples each simulated client holds.

A partition is an index view: each client is a sorted array of sample indices of one split,
given to ``FastMNISTLoader(..., indices=...)`` (``Partition.loader``); no image is copied.
The partitioners are Flower Datasets' (``flwr_datasets.partitioner``), drawn from
``numpy.random.default_rng(seed)`` with the same calls in the same order, so the same seed
gives the same clients as Flower's partitioner over the same labels (``iid`` and ``shards``
differ where Flower's would leave samples out: see each function).
"""

import dataclasses
import hashlib
import json
import os
import warnings

import numpy as np

from .errors import FastMNISTError

METHODS = ("iid", "dirichlet", "pathological", "shards")
MAX_TRIES = 10  # Dirichlet draws tried for min_partition_size, as Flower tries them


@dataclasses.dataclass(frozen=True)
class Partition:
    """``clients[i]``: client ``i``'s sample indices (sorted int64) of ``split`` of the set at
    ``path``; ``labels``: the split's int64 class labels ``(N,)``; ``method``/``params``:
    what drew it. ``digest`` names the result (a run records it to prove which partition it
    used)."""

    path: str | None
    split: str
    method: str
    params: dict
    clients: list
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, client: int) -> np.ndarray:
        return self.clients[client]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def counts(self) -> np.ndarray:
        """int64 ``(clients, classes)``: each client's samples per class."""
        return np.stack([np.bincount(self.labels[c], minlength=self.num_classes) for c in self.clients])

    @property
    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.split, self.method, self.params], sort_keys=True).encode())
        for c in self.clients:
            h.update(len(c).to_bytes(8, "little") + c.astype("<i8").tobytes())
        return h.hexdigest()[:32]

    def record(self) -> dict:
        """What a run logs to say which partition it trained on: method, parameters, digest
        and per-client counts."""
        return {"split": self.split, "method": self.method, "params": self.params, "digest": self.digest,
                "sizes": [len(c) for c in self.clients]}

    def holdout(self, client: int, test_fraction: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
        """Client ``client``'s samples split into ``{"train": ..., "test": ...}`` (sorted int64
        indices of the split), stratified by class as ``fastmnist.holdout`` splits."""
        from .loading.select import holdout

        if not isinstance(test_fraction, float) or not 0 < test_fraction < 1:
            raise FastMNISTError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
        mine = self[client]
        parts = holdout(self.labels[mine], {"train": 1 - test_fraction, "test": test_fraction}, seed=seed)
        return {name: mine[idx] for name, idx in parts.items()}

    def loader(self, client: int, indices: np.ndarray | None = None, **kwargs):
        """A ``FastMNISTLoader`` over client ``client``'s samples (or ``indices``, a part of
        them from ``holdout``); ``kwargs`` as the loader takes them."""
        from .loader import FastMNISTLoader

        if self.path is None:
            raise FastMNISTError("this partition was made from labels, not a set: give partition() a path")
        mine = self[client] if indices is None else indices
        return FastMNISTLoader(self.path, self.split, indices=mine, **kwargs)


def partition(source, num_partitions: int, method: str = "iid", split: str = "train", seed: int = 42,
              **params) -> Partition:
    """Split the samples of ``split`` of the local set at ``source`` (or a sequence of int
    class labels) among ``num_partitions`` clients, disjoint and covering the split::

        clients = fastmnist.partition("shards/mnist", 100, "dirichlet", alpha=0.3)
        loader = clients.loader(7, batch_size=32)

    ``method`` and its ``params``: "iid"; "dirichlet" (``alpha``, ``min_partition_size=10``,
    ``self_balancing=False``); "pathological" (``num_classes_per_partition``,
    ``class_assignment_mode="random"``); "shards" (``num_shards_per_partition``)."""
    labels, path = _labels(source, split)
    if method not in METHODS:
        raise FastMNISTError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(num_partitions, int) or isinstance(num_partitions, bool) or num_partitions < 1:
        raise FastMNISTError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if num_partitions > len(labels):
        raise FastMNISTError(f"num_partitions {num_partitions} is more than the {len(labels)} samples of "
                             f"{split}: some clients would hold nothing")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FastMNISTError(f"seed must be an integer, got {seed!r}")
    draw = {"iid": iid, "dirichlet": dirichlet, "pathological": pathological, "shards": shards}[method]
    try:
        clients = draw(labels, num_partitions, seed=seed, **params)
    except TypeError as e:
        raise FastMNISTError(f"{method}: {e}") from None
    recorded = {"num_partitions": num_partitions, "seed": seed, **params}
    return Partition(path, split, method, recorded, [np.sort(c).astype(np.int64) for c in clients], labels)


def _labels(source, split: str) -> tuple[np.ndarray, str | None]:
    if isinstance(source, (str, os.PathLike)):
        from .store import open_shards

        labels, path = np.asarray(open_shards(source).split(split).array("labels")), os.fspath(source)
    else:
        labels, path = np.asarray(source), None
    if labels.ndim != 1 or len(labels) == 0 or labels.dtype.kind not in "iu":
        raise FastMNISTError(f"partition: expected one integer class label per sample, got labels of shape "
                             f"{labels.shape} ({labels.dtype})")
    return labels.astype(np.int64), path


def iid(labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Clients of near-equal size (differing by at most one), drawn uniformly: a seeded
    permutation dealt out in consecutive runs. (Flower's ``IidPartitioner`` takes
    consecutive runs of the dataset as given, shuffled by ``FederatedDataset`` with its own
    seed: the same kind of partition, other samples.)"""
    order = np.random.default_rng(seed).permutation(len(labels))
    return np.array_split(order, num_partitions)


def dirichlet(labels: np.ndarray, num_partitions: int, seed: int, alpha, min_partition_size: int = 10,
              self_balancing: bool = False) -> list[np.ndarray]:
    """Label skew as Flower's ``DirichletPartitioner`` draws it: for each class in ascending
    order, proportions over the clients from Dirichlet(``alpha``) (one value, or one per
    client), the class's samples (in index order) cut at the proportions' cumulative sums
    (truncated); with ``self_balancing``, clients already above the mean size get none of
    the class. Drawn again, up to 10 times, until every client holds ``min_partition_size``."""
    a = np.full(num_partitions, alpha, np.float64) if np.isscalar(alpha) else np.asarray(alpha, np.float64)
    if a.shape != (num_partitions,) or not np.isfinite(a).all() or (a <= 0).any():
        raise FastMNISTError(f"dirichlet: alpha must be > 0 (one value, or one per client), got {alpha!r}")
    if not isinstance(min_partition_size, int) or min_partition_size < 0:
        raise FastMNISTError(f"dirichlet: min_partition_size must be an integer >= 0, "
                             f"got {min_partition_size!r}")
    if min_partition_size * num_partitions > len(labels):
        raise FastMNISTError(f"dirichlet: {num_partitions} clients of at least {min_partition_size} samples "
                             f"need {min_partition_size * num_partitions}; the split has {len(labels)}")
    rng, mean_size = np.random.default_rng(seed), len(labels) / num_partitions
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    for _ in range(MAX_TRIES + 1):
        owner, sizes = np.empty(len(labels), np.int64), np.zeros(num_partitions, np.int64)
        for members in by_class:
            p = rng.dirichlet(a)
            if self_balancing:
                p = [0.0 if sizes[c] > mean_size else v for c, v in enumerate(p.tolist())]
                total = sum(p)  # summed in order, as Flower sums them
                p = [v / total for v in p]
            cuts = (np.cumsum(p) * len(members)).astype(int)[:-1]
            for client, part in enumerate(np.split(members, cuts)):
                owner[part] = client
                sizes[client] += len(part)
        if sizes.min() >= min_partition_size:
            return _grouped(owner, num_partitions)
    raise FastMNISTError(f"dirichlet: no draw in {MAX_TRIES + 1} gave every client {min_partition_size} "
                         f"samples (alpha {alpha}, {num_partitions} clients, {len(labels)} samples): raise "
                         "alpha or lower min_partition_size")


def pathological(labels: np.ndarray, num_partitions: int, seed: int, num_classes_per_partition: int,
                 class_assignment_mode: str = "random") -> list[np.ndarray]:
    """Each client holds exactly ``num_classes_per_partition`` classes, as Flower's
    ``PathologicalPartitioner`` assigns them ("random": each client's classes drawn without
    replacement; "deterministic": client ``i`` takes classes ``i, i+1, ...`` modulo the
    class count; "first-deterministic": class ``i`` mod the count, then random ones); each
    class's samples (in index order) are cut into equal runs among the clients holding it.
    Where Flower warns of a class no client holds, this refuses: its samples would be in no
    client."""
    classes = np.unique(labels).tolist()
    k = num_classes_per_partition
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(classes):
        raise FastMNISTError(f"pathological: num_classes_per_partition must be in 1..{len(classes)} (the "
                             f"classes present), got {k!r}")
    rng, held = np.random.default_rng(seed), []
    for client in range(num_partitions):
        if class_assignment_mode == "random":
            held.append(rng.choice(classes, size=k, replace=False).tolist())
        elif class_assignment_mode == "deterministic":
            held.append([classes[(client + i) % len(classes)] for i in range(k)])
        elif class_assignment_mode == "first-deterministic":
            mine = [classes[client % len(classes)]]
            while len(mine) < k:
                c = rng.choice(classes, size=1)[0]
                if c not in mine:
                    mine.append(c)
            held.append(mine)
        else:
            raise FastMNISTError("pathological: class_assignment_mode must be 'random', 'deterministic' or "
                                 f"'first-deterministic', got {class_assignment_mode!r}")
    holders = {c: [i for i, mine in enumerate(held) if c in mine] for c in classes}
    unheld = [c for c, who in holders.items() if not who]
    if unheld:
        raise FastMNISTError(f"pathological: classes {unheld} fall to no client ({num_partitions} clients of "
                             f"{k} classes, seed {seed}), so their samples would be left out: use more "
                             "clients, more classes per client, or class_assignment_mode='deterministic'")
    owner = np.empty(len(labels), np.int64)
    for c, who in holders.items():
        members = np.flatnonzero(labels == c)
        if len(who) > len(members):
            raise FastMNISTError(f"pathological: class {c} has {len(members)} samples for {len(who)} clients")
        for client, part in zip(who, np.array_split(members, len(who)), strict=True):
            owner[part] = client
    return _grouped(owner, num_partitions)


def shards(labels: np.ndarray, num_partitions: int, seed: int, num_shards_per_partition: int = 2
           ) -> list[np.ndarray]:
    """McMahan et al.'s non-IID split, as Flower's ``ShardPartitioner`` makes it over a
    label-sorted dataset: the samples sorted by label (stably), cut into
    ``num_partitions * num_shards_per_partition`` shards, the shards permuted and dealt
    ``num_shards_per_partition`` to a client. Where the count does not divide evenly
    Flower leaves the remainder out; here the first shards are one sample longer (the
    same shards as Flower's when it divides, as for 60,000 samples and 100 clients of 2)."""
    s = num_shards_per_partition
    if not isinstance(s, int) or isinstance(s, bool) or s < 1:
        raise FastMNISTError(f"shards: num_shards_per_partition must be a positive integer, got {s!r}")
    total = num_partitions * s
    if total > len(labels):
        raise FastMNISTError(f"shards: {total} shards of {len(labels)} samples would leave some empty")
    runs = np.array_split(np.argsort(labels, kind="stable"), total)
    dealt = np.random.default_rng(seed).permutation(total)
    return [np.concatenate([runs[j] for j in dealt[i * s:(i + 1) * s]]) for i in range(num_partitions)]


def _grouped(owner: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """The indices of each client, from ``owner`` (the client of each sample)."""
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_partitions))[:-1])


def heatmap(part: Partition, path) -> None:
    """A PNG of ``part.counts`` (clients down, classes across): the label skew at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = part.counts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig, ax = plt.subplots(figsize=(6, min(12, 2 + 0.12 * len(counts))))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(counts.shape[1]))
    ax.set_title(f"{part.method} {json.dumps(part.params, sort_keys=True)}", fontsize=8)
    fig.colorbar(image, ax=ax, label="samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
