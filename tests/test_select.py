"""Choosing what an epoch visits: hold-out parts, subsets, class filters, weighted draws.
Checked against the full index set, DistributedSampler's split, torch.multinomial's
frequencies and an uninterrupted run."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from fastmnist import FastMNISTError, FastMNISTLoader, holdout
from fastmnist.cli import main
from fastmnist.formats.idx import read_labels

from .conftest import INDEXED_N, batch_indices

LABELS = np.arange(INDEXED_N) % 10  # the indexed set's train labels


def epoch(loader) -> list[int]:
    return [i for b in batch_indices(loader) for i in b]


def raw(shards, **kwargs) -> FastMNISTLoader:
    """A loader of the indexed set's uint8 images, whose pixels say their sample index."""
    return FastMNISTLoader(shards, normalize=False, **kwargs)


@pytest.fixture(scope="module")
def real_labels(real_root):
    return np.asarray(read_labels(real_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"))


@pytest.mark.parametrize("sizes", [{"train": 9000, "val": 1000}, {"a": 0.7, "b": 0.2, "c": 0.1},
                                   {"train": 8333, "val": 1666, "tiny": 1}])
def test_stratified_holdout_of_the_real_digits(real_labels, sizes):
    parts = holdout(real_labels, sizes, seed=0)
    per_class = np.bincount(real_labels, minlength=10)
    joined = np.concatenate(list(parts.values()))
    assert len(joined) == len(real_labels) and set(joined.tolist()) == set(range(len(real_labels)))
    for name, idx in parts.items():
        fraction = len(idx) / len(real_labels)
        assert len(idx) == (sizes[name] if isinstance(sizes[name], int) else len(idx))
        assert (np.abs(np.bincount(real_labels[idx], minlength=10) - fraction * per_class) < 1).all(), name
    again, other = holdout(real_labels, sizes, seed=0), holdout(real_labels, sizes, seed=1)
    assert all(np.array_equal(again[k], parts[k]) for k in parts)
    assert not np.array_equal(other[next(iter(parts))], parts[next(iter(parts))])


def test_random_holdout_covers_the_split_and_is_seeded():
    parts = holdout(LABELS, {"train": 903, "val": 100}, seed=4, stratify=False)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(INDEXED_N))
    again = holdout(LABELS, {"train": 903, "val": 100}, seed=4, stratify=False)
    assert np.array_equal(again["val"], parts["val"])


def test_holdout_command_prints_the_table_and_writes_what_the_loader_takes(indexed_shards, tmp_path, capsys):
    out = tmp_path / "parts.json"
    assert main(["holdout", str(indexed_shards), "--sizes", "train=903,val=100", "--seed", "3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stratified, seed 3" in printed and "  val      100  10  10  10" in printed
    parts = json.loads(out.read_text())["parts"]
    assert parts["val"] == holdout(indexed_shards, {"train": 903, "val": 100}, seed=3)["val"].tolist()
    val = FastMNISTLoader(indexed_shards, indices=parts["val"], shuffle=False, normalize=False)
    assert epoch(val) == parts["val"]


def test_convert_val_fraction_of_idx_points_to_the_loader_time_split(real_root, tmp_path, capsys):
    for args in (["--root", str(real_root)], [str(real_root)], [str(real_root), "--from", "idx"]):
        assert main(["convert", *args, "--out", str(tmp_path / "set"), "--val-fraction", "0.1"]) == 2
        assert "fastmnist holdout OUT --sizes" in capsys.readouterr().err
    assert not (tmp_path / "set").exists()


SUBSETS = [{"indices": list(range(5, 900, 7))}, {"classes": [2, 7]}, {"per_class": 13},
           {"indices": list(range(0, INDEXED_N, 3)), "classes": [1, 3, 4], "per_class": 20}]


def _members(kwargs) -> set[int]:
    chosen = set(kwargs.get("indices", range(INDEXED_N)))
    chosen = {i for i in chosen if LABELS[i] in kwargs.get("classes", range(10))}
    if "per_class" in kwargs:
        chosen = {i for i in chosen if sum(1 for j in chosen if LABELS[j] == LABELS[i] and j < i)
                  < kwargs["per_class"]}
    return chosen


@pytest.mark.parametrize("kwargs", SUBSETS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_subset_is_visited_exactly_once_across_ranks(indexed_shards, kwargs, world_size):
    members = _members(kwargs)
    shares = [epoch(raw(indexed_shards, batch_size=16, rank=r, world_size=world_size, even=False, seed=5,
                        **kwargs)) for r in range(world_size)]
    assert sorted(i for s in shares for i in s) == sorted(members)
    # with even=True: DistributedSampler's counts and padding over the epoch's sequence
    whole = epoch(FastMNISTLoader(indexed_shards, batch_size=16, normalize=False, seed=5, **kwargs))
    for r in range(world_size):
        loader = raw(indexed_shards, batch_size=16, rank=r, world_size=world_size, seed=5, **kwargs)
        expected = [whole[i] for i in DistributedSampler(range(len(whole)), world_size, r, shuffle=False)]
        assert epoch(loader) == expected and len(loader) == -(-len(expected) // 16)


def test_a_subset_epoch_is_a_fresh_permutation_of_it(indexed_shards):
    loader = FastMNISTLoader(indexed_shards, batch_size=50, normalize=False, classes=[4])
    first, second = epoch(loader), epoch(loader)
    assert sorted(first) == sorted(second) == list(range(4, INDEXED_N, 10)) and first != second
    assert epoch(FastMNISTLoader(indexed_shards, normalize=False, classes=[4], shuffle=False)) == \
        list(range(4, INDEXED_N, 10))


@pytest.mark.parametrize("kwargs", [SUBSETS[0], {"balanced": True, "classes": [1, 2, 3]}])
@pytest.mark.parametrize("resume_on", [2, 3])
def test_resume_mid_epoch_on_another_world_size_gives_exactly_the_rest(indexed_shards, kwargs, resume_on):
    def loaders(world_size):
        return [FastMNISTLoader(indexed_shards, batch_size=10, normalize=False, rank=r, world_size=world_size,
                                seed=9, even=False, **kwargs) for r in range(world_size)]

    full = sorted(i for loader in loaders(2) for i in epoch(loader))
    first = loaders(2)
    iterators = [iter(loader) for loader in first]
    seen = [i for it in iterators for _ in range(4) for i in batch_indices([next(it)])[0]]
    state = first[0].state_dict()
    assert len(json.dumps(state)) < 1000
    rest = []
    for loader in loaders(resume_on):
        loader.load_state_dict(state)
        rest += epoch(loader)
    assert sorted(seen + rest) == full


def test_resume_of_a_weighted_epoch_continues_batch_for_batch(indexed_shards):
    weights = np.random.default_rng(0).random(INDEXED_N)
    uninterrupted = batch_indices(raw(indexed_shards, batch_size=20, weights=weights))
    loader = FastMNISTLoader(indexed_shards, batch_size=20, normalize=False, weights=weights)
    it = iter(loader)
    head = batch_indices([next(it) for _ in range(7)])
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = FastMNISTLoader(indexed_shards, batch_size=20, normalize=False, weights=weights)
    resumed.load_state_dict(state)
    assert head + batch_indices(resumed) == uninterrupted
    other = FastMNISTLoader(indexed_shards, batch_size=20, normalize=False, weights=weights[::-1].copy())
    with pytest.raises(FastMNISTError, match="state_dict was saved with selection="):
        other.load_state_dict(state)


def test_the_state_of_a_weighted_loader_over_60000_samples_stays_small(synth_shards):
    loader = FastMNISTLoader(synth_shards, weights=np.random.default_rng(1).random(60000), num_samples=60000)
    it = iter(loader)
    for _ in range(100):
        next(it)
    assert len(json.dumps(loader.state_dict())) < 1000


def _chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


GROUPS = np.arange(INDEXED_N) % 7  # samples grouped by weight, so each group's count is large
WEIGHTS = np.where(np.arange(INDEXED_N) % 50 == 0, 0.0, 0.5 + GROUPS)  # every 50th never drawn


def test_draws_with_replacement_follow_the_weights_as_torch_multinomial_does(indexed_shards):
    loader = raw(indexed_shards, batch_size=100, weights=WEIGHTS, num_samples=500)
    drawn = np.array([i for _ in range(40) for i in epoch(loader)])
    assert not np.isin(drawn, np.arange(0, INDEXED_N, 50)).any()
    p = WEIGHTS / WEIGHTS.sum()
    expected = np.bincount(GROUPS, weights=p) * len(drawn)
    reference = torch.multinomial(torch.tensor(WEIGHTS), len(drawn), replacement=True,
                                  generator=torch.Generator().manual_seed(0)).numpy()
    ours, torchs = (_chi_square(np.bincount(GROUPS[d], minlength=7), expected) for d in (drawn, reference))
    bound = 6 + 5 * np.sqrt(12)  # chi-square with 6 degrees of freedom: mean 6, sd sqrt(12)
    assert ours < bound and torchs < bound, (ours, torchs)
    uniform = np.full(7, len(drawn) / 7)  # and the test can tell weights from none
    assert _chi_square(np.bincount(GROUPS[drawn], minlength=7), uniform) > 10 * bound


def test_draws_without_replacement_match_torch_multinomials_inclusion(indexed_shards):
    loader = raw(indexed_shards, batch_size=100, weights=WEIGHTS, num_samples=400, replacement=False)
    epochs = [epoch(loader) for _ in range(60)]
    assert all(len(set(e)) == 400 for e in epochs)  # no repeats within an epoch
    generator = torch.Generator().manual_seed(0)
    reference = [torch.multinomial(torch.tensor(WEIGHTS), 400, generator=generator).numpy()
                 for _ in range(60)]
    ours = np.bincount(GROUPS[np.concatenate(epochs)], minlength=7).astype(float)
    torchs = np.bincount(GROUPS[np.concatenate(reference)], minlength=7).astype(float)
    homogeneity = float(((ours - torchs) ** 2 / (ours + torchs)).sum())  # two samples, 6 dof
    assert homogeneity < 6 + 5 * np.sqrt(12), (ours, torchs)


def test_balanced_draws_give_each_class_of_a_skewed_subset_its_share(indexed_shards):
    skewed = [i for i in range(INDEXED_N) if LABELS[i] == 0] + [1, 11, 21] + list(range(2, 500, 10))
    loader = FastMNISTLoader(indexed_shards, batch_size=100, normalize=False, indices=skewed, balanced=True,
                             num_samples=3000)
    drawn = np.array(epoch(loader))
    assert set(drawn.tolist()) <= set(skewed)
    counts = np.bincount(LABELS[drawn], minlength=3)[:3]
    assert (np.abs(counts - 1000) < 3 * np.sqrt(3000 * 2 / 9)).all(), counts


def test_class_weights_per_class_and_as_a_mapping(indexed_shards):
    by_list = FastMNISTLoader(indexed_shards, normalize=False, class_weights=[0, 1, 0, 0, 0, 0, 0, 0, 0, 3])
    by_dict = FastMNISTLoader(indexed_shards, normalize=False, class_weights={1: 1, 9: 3})
    drawn = epoch(by_list)
    assert drawn == epoch(by_dict) and set(LABELS[drawn].tolist()) == {1, 9}


@pytest.mark.parametrize("kwargs, message", [
    ({"weights": np.r_[-1.0, np.ones(INDEXED_N - 1)]}, "weights: value -1.0 at 0; weights must be finite"),
    ({"weights": np.r_[np.nan, np.ones(INDEXED_N - 1)]}, "weights: value nan at 0"),
    ({"weights": np.r_[np.ones(INDEXED_N - 1), np.inf]}, f"weights: value inf at {INDEXED_N - 1}"),
    ({"weights": np.zeros(INDEXED_N)}, "every chosen sample has weight 0"),
    ({"weights": np.ones(10)}, f"weights: 10 values, expected {INDEXED_N}"),
    ({"weights": ["a"] * INDEXED_N}, "weights: expected numbers"),
    ({"class_weights": [1, 2]}, "class_weights: 2 values, expected 10"),
    ({"indices": [3, INDEXED_N]}, f"indices: {INDEXED_N} is out of range 0..{INDEXED_N - 1}"),
    ({"indices": [-1]}, "indices: -1 is out of range"),
    ({"indices": [4, 5, 4]}, "indices: 4 appears 2 times"),
    ({"indices": []}, "indices: empty"),
    ({"indices": [0.5]}, "indices: expected a 1-D sequence of integers"),
    ({"classes": [11]}, "classes: 11 is out of range 0..9"),
    ({"classes": [3], "indices": [0, 1, 2]}, "classes: class 3 has no sample in the selection"),
    ({"per_class": 0}, "per_class must be a positive integer"),
    ({"weights": np.ones(INDEXED_N), "balanced": True}, "give one of weights, class_weights and balanced"),
    ({"num_samples": 5}, "num_samples is for weighted sampling"),
    ({"balanced": True, "num_samples": 0}, "num_samples must be a positive integer"),
    ({"balanced": True, "num_samples": 2000, "replacement": False}, "num_samples 2000 without replacement"),
])
def test_bad_choices_are_refused_at_construction(indexed_shards, kwargs, message):
    with pytest.raises(FastMNISTError, match=message):
        FastMNISTLoader(indexed_shards, **kwargs)


@pytest.mark.parametrize("sizes, message", [
    ({"a": 0.5, "b": 0.4}, r"fractions \[0.5, 0.4\] must be in 0..1 and add up to 1"),
    ({"a": 1000, "b": 2}, "counts .* must be >= 0 and add up to the 1003 samples"),
    ({"a": 1003.0, "b": 0}, "give all counts .* or all fractions"),
    ([0.5, 0.5], "sizes: expected {part name: count or fraction}"),
])
def test_bad_holdout_sizes_are_refused(sizes, message):
    with pytest.raises(FastMNISTError, match=message):
        holdout(LABELS, sizes)


def test_weighted_sampling_needs_a_local_set(indexed_shards, tmp_path):
    from fastmnist import convert

    from .conftest import served
    convert(indexed_shards.parent, tmp_path / "set", format="wds", progress=False)
    with served(tmp_path / "set") as url:
        with pytest.raises(FastMNISTError, match="weighted sampling .* needs a local set"):
            FastMNISTLoader(url, weights=np.ones(INDEXED_N))
        with pytest.raises(FastMNISTError, match="choosing samples by class needs the labels of a local set"):
            FastMNISTLoader(url, classes=[1])
        streamed = FastMNISTLoader(url, indices=list(range(100, 300)), normalize=False, batch_size=50)
        assert sorted(epoch(streamed)) == list(range(100, 300))


@pytest.fixture(scope="module")
def marked_shards(tmp_path_factory):
    """A second indexed set (train 300, test 10) whose pixel [0, 2] is 1: its samples are told
    apart from the first set's in a mixture."""
    from fastmnist import convert

    from .conftest import indexed_images, write_split

    root = tmp_path_factory.mktemp("marked")
    images = indexed_images(300)
    images[:, 0, 2] = 1
    write_split(root, "train", images, np.arange(300) % 10)
    write_split(root, "test", indexed_images(10), np.arange(10) % 10)
    convert(root, root / "set", progress=False)
    return root / "set"


def mixed_epoch(batches) -> list[tuple[int, int]]:
    """(part, sample index) of each sample of ``batches`` (an epoch of a uint8 mixture of the
    indexed and the marked set)."""
    return [(int(image[0, 0, 2]), i) for x, y in batches
            for image, i in zip(x, batch_indices([(x, y)])[0], strict=True)]


def test_a_mixture_draws_each_part_its_share_in_passes_over_it(indexed_shards, marked_shards):
    loader = raw(indexed_shards, batch_size=64, mix_with=[marked_shards], proportions=[0.5, 0.5],
                 num_samples=400)
    seen = {0: [], 1: []}
    for _ in range(6):
        drawn = mixed_epoch(loader)
        assert len(drawn) == 400 and sum(part for part, _ in drawn) == 200  # 200 of each, every epoch
        for part, i in drawn:
            seen[part].append(i)
        # every sample of a part once before any twice: after each epoch, counts differ by at most 1
        for part, n in ((0, INDEXED_N), (1, 300)):
            counts = np.bincount(seen[part], minlength=n)
            assert len(counts) == n and counts.max() - counts.min() <= 1
    assert np.bincount(seen[1]).tolist() == [4] * 300  # 1,200 draws of 300: four whole passes
    counts = [200, 100]
    loader = raw(indexed_shards, batch_size=64, mix_with=[(marked_shards, "train")],
                 proportions=counts)
    assert np.bincount([p for p, _ in mixed_epoch(loader)]).tolist() == counts and len(loader) == 5


def test_a_mixture_gives_each_sample_its_own_sets_bytes(real_shards, indexed_shards):
    mixture = FastMNISTLoader(real_shards, "test", batch_size=500, mix_with=[indexed_shards], seed=3)
    x = torch.cat([x for x, _ in mixture])
    order = mixture.rank_order(0)
    assert len(order) == 10000 + INDEXED_N
    real = FastMNISTLoader(real_shards, "test").dataset
    indexed = FastMNISTLoader(indexed_shards).dataset
    for k in range(0, len(order), 37):
        g = int(order[k])
        expected = real[g][0] if g < 10000 else indexed[g - 10000][0]
        assert torch.equal(x[k], expected), k


def test_a_mixture_resumes_exactly_across_an_epoch_boundary(indexed_shards, marked_shards):
    def make():
        return raw(indexed_shards, batch_size=50, mix_with=[marked_shards], proportions=[0.3, 0.7],
                   num_samples=450, world_size=2, rank=1, seed=8)

    uninterrupted = make()
    expected = [mixed_epoch(uninterrupted) for _ in range(3)]
    first = make()
    head = mixed_epoch(first)
    it = iter(first)
    head2 = mixed_epoch([next(it), next(it)])
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [head, head2 + mixed_epoch(resumed), mixed_epoch(resumed)] == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"proportions": [0.5, 0.4]}, r"fractions \[0.5, 0.4\] must be >= 0 and add up to 1"),
    ({"proportions": [1.0]}, "proportions: 1 values for 2 parts"),
    ({"proportions": [0, 0]}, "must be >= 0, and not all 0"),
    ({"proportions": [5, 5], "num_samples": 10}, "num_samples: with counts as proportions"),
    ({"proportions": [0.5, 0.5], "num_samples": 0}, "num_samples must be a positive integer"),
    ({"classes": [1]}, "classes= with mix_with"),
    ({"resident": True}, "resident=True with mix_with"),
])
def test_bad_mixtures_are_refused_at_construction(indexed_shards, marked_shards, kwargs, message):
    with pytest.raises(FastMNISTError, match=message):
        FastMNISTLoader(indexed_shards, mix_with=[marked_shards], **kwargs)


def test_a_mixture_of_differently_normalised_sets_is_refused(indexed_shards, tmp_path):
    from fastmnist import convert

    convert(indexed_shards.parent, tmp_path / "other", mean=0.5, std=0.25, progress=False)
    with pytest.raises(FastMNISTError, match=r"mean 0.5 std 0.25, the first part with 0.1307"):
        FastMNISTLoader(indexed_shards, mix_with=[tmp_path / "other"])
    assert len(list(raw(indexed_shards, mix_with=[tmp_path / "other"]))) > 0  # uint8 as stored: fine
    with pytest.raises(FastMNISTError, match="proportions are those of a mixture"):
        FastMNISTLoader(indexed_shards, proportions=[1.0])
    with pytest.raises(FastMNISTError, match="mix_with: expected a non-empty list"):
        FastMNISTLoader(indexed_shards, mix_with=str(tmp_path / "other"))
