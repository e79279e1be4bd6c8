"""Which samples an epoch visits: the stage between the epoch's order and the rank split.

A selection turns the split's order of an epoch (int64 ``(N,)``, a permutation of its
sample indices, from ``(seed, epoch)``; ``None`` to a selection that ``needs_order`` not)
into the epoch's sequence of sample indices: a subset
of them in that order, or a weighted draw (with repeats when drawn with replacement). It is
a pure function of ``(seed, epoch)``, so every rank computes the same sequence and splits it
as before, and resume counts positions of it as before; a state records only its ``digest``.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
import torch

from ..errors import FastMNISTError
from .order import epoch_order


class Everything:
    """Every sample of the split, in the epoch's order."""

    digest = None
    needs_order = True

    def __init__(self, n: int):
        self.count = n

    def epoch(self, order: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        return order


class Subset:
    """The samples ``members`` (bool ``(N,)``) in the epoch's order: a permutation of them
    when shuffled, ascending otherwise; whatever the source, so streamed shards keep their
    shard-at-a-time order."""

    needs_order = True

    def __init__(self, members: np.ndarray, described: str):
        self.members, self.count, self.described = members, int(members.sum()), described
        self.digest = _digest(b"subset", np.packbits(members).tobytes(), described.encode())

    def epoch(self, order: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        return order[torch.from_numpy(self.members)[order]]


class Members:
    """The samples ``members`` (sorted int64 ``(M,)``) in their own order: a permutation of
    them drawn from ``(seed, epoch)`` when shuffled, ascending otherwise. O(M) an epoch,
    whatever the split's size (a ``Subset`` permutes the whole split), so a small part of a
    large split (a federated client, a validation part) costs only its own samples; for
    local sets read in plain permutations."""

    needs_order = False

    def __init__(self, members: np.ndarray, described: str, shuffle: bool):
        self.members, self.count, self.shuffle = torch.from_numpy(members), len(members), shuffle
        self.digest = _digest(b"members", members.astype("<i8").tobytes(), described.encode())

    def epoch(self, order, seed: int, epoch: int) -> torch.Tensor:
        return self.members[epoch_order(self.count, seed, epoch, self.shuffle, 8)]


class Weighted:
    """``num_samples`` draws from the samples with weights ``weights`` (float64 ``(N,)``,
    zero outside a subset), as ``WeightedRandomSampler`` draws them: with ``replacement``
    independently, otherwise without repeats; from a generator seeded by ``(seed, epoch)``.
    Draws with replacement use Walker's alias table, built once: two random numbers a
    draw, already in a random order."""

    needs_order = False

    def __init__(self, weights: np.ndarray, num_samples: int, replacement: bool):
        self.p, self.count, self.replacement = weights / weights.sum(), num_samples, replacement
        self.digest = _digest(b"weighted", weights.tobytes(), f"{num_samples} {replacement}".encode())
        self._alias = None  # (probability, alias) per sample, made on first use

    def epoch(self, order, seed: int, epoch: int) -> torch.Tensor:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 4])))
        if not self.replacement:
            return torch.from_numpy(rng.choice(len(self.p), self.count, replace=False, p=self.p))
        if self._alias is None:
            self._alias = alias_table(self.p)
        probability, alias = self._alias
        column = rng.integers(0, len(self.p), self.count)
        return torch.from_numpy(np.where(rng.random(self.count) < probability[column], column, alias[column]))

    def __getstate__(self):
        return {**self.__dict__, "_alias": None}


def alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias table of the distribution ``p`` (float64 ``(n,)``, adding up to 1):
    drawing a column ``k`` uniformly, then ``k`` with probability ``probability[k]`` and
    ``alias[k]`` otherwise, draws ``k`` with probability ``p[k]``."""
    n = len(p)
    scaled = (p * n).tolist()
    alias = list(range(n))
    small = [k for k, v in enumerate(scaled) if v < 1.0]
    large = [k for k, v in enumerate(scaled) if v >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        alias[s] = g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    for k in small + large:  # left over by rounding: full columns
        scaled[k] = 1.0
    return np.array(scaled), np.array(alias, dtype=np.int64)


class Mixture:
    """Samples of several parts (``sizes[i]`` samples each, at consecutive indices from
    part 0), ``counts[i]`` of part ``i`` per epoch. Each part is drawn in passes over it, a
    fresh permutation a pass (in order without ``shuffle``), the passes running on across
    epochs: every sample of a part comes once before any comes twice, and a part smaller
    than its count repeats within the epoch. The epoch's draws are then shuffled together
    (without ``shuffle``: interleaved evenly, part by part). ``identity``: what names the
    parts (a digest of their manifest entries)."""

    needs_order = False

    def __init__(self, sizes: list[int], counts: list[int], shuffle: bool, identity: str):
        self.sizes, self.counts, self.shuffle, self.count = sizes, counts, shuffle, sum(counts)
        self.offsets = np.cumsum([0, *sizes[:-1]])
        self.digest = _digest(b"mixture", identity.encode(), f"{sizes} {counts} {shuffle}".encode())

    def epoch(self, order: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        drawn = []
        for i, (n, c, offset) in enumerate(zip(self.sizes, self.counts, self.offsets, strict=True)):
            start, stop = epoch * c, (epoch + 1) * c  # positions in part i's endless run of passes
            passes = [epoch_order(n, seed, lap, self.shuffle, 6, i).numpy()
                      for lap in range(start // n, -(-stop // n))]
            run = np.concatenate(passes) if passes else np.empty(0, np.int64)
            drawn.append(offset + run[start - (start // n) * n:][:c])
        sequence = np.concatenate(drawn)
        if self.shuffle:
            np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, 7]))).shuffle(sequence)
            return torch.from_numpy(sequence)
        place = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts if c])
        return torch.from_numpy(sequence[np.argsort(place, kind="stable")])


def mixture_counts(sizes: list[int], proportions, num_samples: int | None) -> list[int]:
    """Per-epoch draws of each part: ``proportions`` as counts (integers, the epoch's length
    their sum), or as fractions adding up to 1 of ``num_samples`` (default: all the parts'
    samples together), rounded by largest remainder."""
    values = list(proportions)
    if len(values) != len(sizes):
        raise FastMNISTError(f"proportions: {len(values)} values for {len(sizes)} parts (this split and "
                             "mix_with's)")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if any(v < 0 for v in values) or sum(values) == 0:
            raise FastMNISTError(f"proportions: counts {values} must be >= 0, and not all 0")
        if num_samples is not None:
            raise FastMNISTError("num_samples: with counts as proportions, the epoch is their sum")
        return values
    try:
        fractions = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise FastMNISTError(f"proportions: expected numbers, got {_shown(values)}") from None
    if not np.isfinite(fractions).all() or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise FastMNISTError(f"proportions: fractions {values} must be >= 0 and add up to 1")
    total = sum(sizes) if num_samples is None else num_samples
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise FastMNISTError(f"num_samples must be a positive integer, got {num_samples!r}")
    ideal = fractions * total
    counts = np.floor(ideal).astype(np.int64)
    counts[np.argsort(counts - ideal, kind="stable")[:total - counts.sum()]] += 1
    return counts.tolist()


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:32]


def choose(source, labels, shuffle: bool, indices=None, classes=None, per_class=None, weights=None,
           class_weights=None, balanced: bool = False, num_samples=None, replacement: bool = True,
           proportions=None):
    """The selection the ``FastMNISTLoader`` arguments of the same names ask for, over
    ``source`` (a mixture's ``MixedSource``: a ``Mixture`` of its parts, by
    ``proportions``). ``labels``: a function giving the split's int64 class labels ``(N,)``
    (called only when a choice needs them). Subset first (``indices``, then ``classes``, then
    the first ``per_class`` of each class in index order), then weights within it: per
    sample (``weights``), per class (``class_weights``), or each class the same total
    (``balanced``), drawn ``num_samples`` times (default: the subset's size). Every
    argument is checked here, naming what is wrong."""
    chosen = [name for name, v in (("indices", indices), ("classes", classes), ("per_class", per_class),
                                   ("weights", weights), ("class_weights", class_weights),
                                   ("balanced", balanced or None)) if v is not None]
    if hasattr(source, "parts"):
        if chosen:
            raise FastMNISTError(f"{chosen[0]}= with mix_with: a mixture draws from whole splits; choose "
                                 "within a part by converting it as a set of its own")
        counts = mixture_counts(source.sizes, proportions or source.sizes, num_samples)
        entries = (json.dumps(dataclasses.asdict(p.info), sort_keys=True).encode() for p in source.parts)
        return Mixture(source.sizes, counts, shuffle, _digest(*entries))
    if proportions is not None:
        raise FastMNISTError("proportions are those of a mixture: give the other parts as mix_with")
    selection = _chosen(source.count, labels, source.info.num_classes, indices, classes, per_class, weights,
                        class_weights, balanced, num_samples, replacement)
    if isinstance(selection, Subset) and source.random_access and source.order_name == "samples":
        return Members(np.flatnonzero(selection.members), selection.described, shuffle)
    if isinstance(selection, Weighted) and not source.random_access:
        raise FastMNISTError("weighted sampling draws samples from anywhere in the split: it needs a "
                             "local set (streamed shards are read a shard at a time)")
    return selection


def _chosen(n: int, labels, num_classes: int, indices, classes, per_class, weights, class_weights,
            balanced: bool, num_samples, replacement: bool):
    """``choose`` over one split of ``n`` samples."""
    members = np.ones(n, bool)
    described = []
    if indices is not None:
        members = np.zeros(n, bool)
        chosen = _indices(indices, n)
        members[chosen] = True
        described.append(f"indices {len(chosen)}")
    label_of = None
    if classes is not None or per_class is not None or class_weights is not None or balanced:
        label_of = np.asarray(labels())
        if label_of.ndim != 1:
            raise FastMNISTError("classes/per_class/class_weights/balanced need one class per sample; "
                                 "this split has several labels per sample")
    if classes is not None:
        wanted = _integers(classes, "classes", num_classes)
        members &= np.isin(label_of, wanted)
        for c in wanted:
            if not (members & (label_of == c)).any():
                raise FastMNISTError(f"classes: class {c} has no sample in the selection")
        described.append(f"classes {sorted(set(wanted.tolist()))}")
    if per_class is not None:
        if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1:
            raise FastMNISTError(f"per_class must be a positive integer, got {per_class!r}")
        rank_in_class = np.zeros(n, np.int64)
        for c in np.unique(label_of[members]):
            where = np.flatnonzero(members & (label_of == c))
            rank_in_class[where] = np.arange(len(where))
        members &= rank_in_class < per_class
        described.append(f"per_class {per_class}")
    if not members.any():
        raise FastMNISTError("the selection is empty: no sample of the split is chosen")
    given = [name for name, v in (("weights", weights), ("class_weights", class_weights),
                                  ("balanced", balanced or None)) if v is not None]
    if len(given) > 1:
        raise FastMNISTError(f"give one of weights, class_weights and balanced, not {' and '.join(given)}")
    if not given:
        if num_samples is not None:
            raise FastMNISTError("num_samples is for weighted sampling (weights=, class_weights= or "
                                 "balanced=True)")
        return Everything(n) if members.all() else Subset(members, ", ".join(described))
    if weights is not None:
        w = _weights(weights, "weights", n)
    else:
        present = np.unique(label_of[members])
        if balanced:
            per = np.zeros(num_classes)
            per[present] = 1.0 / np.bincount(label_of[members], minlength=num_classes)[present]
        else:
            per = _weights(class_weights, "class_weights", num_classes)
        w = per[label_of]
    w = np.where(members, w, 0.0)
    nonzero = int(np.count_nonzero(w))
    if nonzero == 0:
        raise FastMNISTError("weights: every chosen sample has weight 0")
    num_samples = int(members.sum()) if num_samples is None else num_samples
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise FastMNISTError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(replacement, bool):
        raise FastMNISTError(f"replacement must be True or False, got {replacement!r}")
    if not replacement and num_samples > nonzero:
        raise FastMNISTError(f"num_samples {num_samples} without replacement, but only {nonzero} samples "
                             "have a weight above 0")
    return Weighted(w, num_samples, replacement)


def _indices(indices, n: int) -> np.ndarray:
    """int64 sample indices, checked: integers in ``[0, n)``, no repeats, at least one."""
    chosen = _integers(indices, "indices", n)
    if len(chosen) == 0:
        raise FastMNISTError("indices: empty; give at least one sample index")
    unique, counts = np.unique(chosen, return_counts=True)
    if (counts > 1).any():
        raise FastMNISTError(f"indices: {int(unique[counts > 1][0])} appears {int(counts.max())} times; "
                             "each sample is visited once per epoch (for repeats use weights=)")
    return chosen


def _integers(values, name: str, bound: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise FastMNISTError(f"{name}: expected a 1-D sequence of integers, got {_shown(values)}")
    array = array.astype(np.int64)
    bad = (array < 0) | (array >= bound)
    if bad.any():
        raise FastMNISTError(f"{name}: {int(array[bad][0])} is out of range 0..{bound - 1}")
    return array


def _weights(values, name: str, n: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, dict):
        dense = np.zeros(n)
        for k, v in values.items():
            dense[_integers([k], name, n)[0]] = v
        values = dense
    try:
        w = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise FastMNISTError(f"{name}: expected numbers, got {_shown(values)}") from None
    if w.shape != (n,):
        raise FastMNISTError(f"{name}: {w.shape[0] if w.ndim == 1 else w.shape} values, expected {n}")
    if not np.isfinite(w).all() or (w < 0).any():
        bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
        raise FastMNISTError(f"{name}: value {w[bad]} at {bad}; weights must be finite and >= 0")
    return w


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def holdout(source, sizes: dict, split: str = "train", seed: int = 0, stratify: bool = True
            ) -> dict[str, np.ndarray]:
    """Split the samples of ``split`` of the local set at ``source`` (or of a sequence of
    class labels) into named parts of ``sizes`` (counts that add up to the total, or
    fractions that add up to 1; the last part takes what rounding leaves), as
    ``random_split`` does, seeded; give a part to ``FastMNISTLoader(..., indices=part)``::

        parts = fastmnist.holdout("shards/mnist", {"train": 55000, "val": 5000})
        val = FastMNISTLoader("shards/mnist", "train", indices=parts["val"], shuffle=False)

    With ``stratify`` each part takes every class in the
    proportion of its size (within one sample, ``stratified_counts``), each class's samples
    shuffled before they are dealt. Returns part name -> sorted int64 sample indices."""
    if isinstance(source, (str, os.PathLike)):
        from ..store import open_shards

        labels = np.asarray(open_shards(source).split(split).array("labels"))
    else:
        labels = np.asarray(source)
    if labels.ndim != 1:
        raise FastMNISTError(f"holdout: expected one class label per sample, got labels of shape "
                             f"{labels.shape}")
    n = len(labels)
    if not isinstance(sizes, dict) or not sizes or not all(isinstance(k, str) for k in sizes):
        raise FastMNISTError(f"sizes: expected {{part name: count or fraction}}, got {_shown(sizes)}")
    values = list(sizes.values())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        counts = values
        if any(v < 0 for v in counts) or sum(counts) != n:
            raise FastMNISTError(f"sizes: counts {counts} must be >= 0 and add up to the {n} samples")
    elif all(isinstance(v, float) for v in values):
        if any(not 0 <= v <= 1 for v in values) or abs(sum(values) - 1) > 1e-9:
            raise FastMNISTError(f"sizes: fractions {values} must be in 0..1 and add up to 1")
        counts = [int(np.floor(v * n)) for v in values[:-1]]
        counts.append(n - sum(counts))
    else:
        raise FastMNISTError(f"sizes: give all counts (int) or all fractions (float), got {values}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 5])))
    if not stratify:
        sequence = rng.permutation(n)
        cuts = np.cumsum([0, *counts])
        return {name: np.sort(sequence[a:b]) for name, a, b in zip(sizes, cuts[:-1], cuts[1:], strict=True)}
    classes = np.unique(labels)
    table = stratified_counts([np.count_nonzero(labels == c) for c in classes], counts)
    parts = {name: [] for name in sizes}
    for c, row in zip(classes, table, strict=True):
        members = rng.permutation(np.flatnonzero(labels == c))
        for name, a, b in zip(sizes, np.cumsum([0, *row[:-1]]), np.cumsum(row), strict=True):
            parts[name].append(members[a:b])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def stratified_counts(class_sizes, part_sizes) -> np.ndarray:
    """int64 ``(classes, parts)``: how many samples of each class each part takes, every
    cell the ideal ``class_size * part_size / total`` rounded down or up, the rows adding up
    to the class sizes and the columns to the part sizes. The cells rounded up are a
    bipartite matching of each class's remainder to the parts' (found by augmenting paths;
    one exists because the fractional parts themselves are a fractional matching)."""
    n_c, s_p = np.asarray(class_sizes, np.int64), np.asarray(part_sizes, np.int64)
    product, total = np.outer(n_c, s_p), int(n_c.sum())
    counts, allowed = product // total, product % total != 0
    need = s_p - counts.sum(0)
    up = np.zeros_like(allowed)
    for c in range(len(n_c)):
        for _ in range(int(n_c[c] - counts[c].sum())):
            via_col, via_row, rows, end = {}, {c: None}, [c], None
            while end is None:  # breadth first: rows reach parts by a free cell, parts rows by a taken one
                r = rows.pop(0)
                for p in np.flatnonzero(allowed[r] & ~up[r]):
                    if p not in via_col:
                        via_col[p] = r
                        if need[p] > 0:
                            end = p
                            break
                        for r2 in np.flatnonzero(up[:, p]):
                            if r2 not in via_row:
                                via_row[r2], rows = p, rows + [r2]
            need[end] -= 1
            p = end
            while p is not None:  # flip the path's cells
                r = via_col[p]
                up[r, p] = True
                p = via_row[r]
                if p is not None:
                    up[r, p] = False
    return counts + up
