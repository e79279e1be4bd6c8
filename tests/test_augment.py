"""Augmentation replayed from the user's torchvision transform: the same pixels as
torchvision's own functional ops given the parameters the loader reports (real MNIST
digits), parameters distributed as torchvision's own draws, the same bytes for a sample
whatever the batch size, world size, workers, resume or residency, and clear refusals."""

import math
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms as v1
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from fastmnist import FastMNISTError, FastMNISTLoader, convert
from fastmnist.formats.idx import read_images, read_labels
from fastmnist.loading import kernels
from fastmnist.loading.augment import (
    _perspective_coefficients,
    _perspective_grid,
    _perspective_system,
    parse,
    uniforms,
)

from .conftest import decode_indices, indexed_images, write_split

MEAN, STD = 0.1307, 0.3081
N = 1003  # samples of the invariance sets


def _v1(*steps, erase=()):
    return v1.Compose([*steps, v1.ToTensor(), v1.Normalize((MEAN,), (STD,)), *erase])


def _v2(*steps, erase=()):
    return v2.Compose(
        [v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN], [STD]), *erase]
    )


NEAREST, BILINEAR = v1.InterpolationMode.NEAREST, v1.InterpolationMode.BILINEAR
CASES = {  # name -> (transform, interpolation of its geometric step)
    "affine": (_v1(v1.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1))), NEAREST),
    "affine shear, bilinear, fill": (
        _v1(
            v1.RandomAffine(
                15,
                translate=(0.2, 0.1),
                scale=(0.8, 1.2),
                shear=(-10, 10, -5, 5),
                interpolation=BILINEAR,
                fill=40,
            )
        ),
        BILINEAR,
    ),
    "affine v2": (_v2(v2.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1))), NEAREST),
    "rotation": (_v1(v1.RandomRotation(30)), NEAREST),
    "rotation bilinear about a point": (
        _v1(v1.RandomRotation((-20, 40), interpolation=BILINEAR, center=(10, 17))),
        BILINEAR,
    ),
    "rotation by quarter turns": (_v1(v1.RandomRotation((90, 90))), NEAREST),
    "rotation by -90 degrees (three quarter turns)": (_v1(v1.RandomRotation((-90, -90))), NEAREST),
    "rotation by a half turn v2, fill": (_v2(v2.RandomRotation((180, 180), fill=7)), NEAREST),
    "rotation by 360 degrees (none)": (_v1(v1.RandomRotation((360, 360))), NEAREST),
    "rotation by -1e-30 degrees (360 after % 360: no quarter turn)": (
        _v1(v1.RandomRotation((-1e-30, -1e-30))), NEAREST),
    "affine, an angle only, v2": (_v2(v2.RandomAffine((-45, 45))), NEAREST),
    "affine extremes, fill": (_v1(v1.RandomAffine(180, translate=(0.5, 0.5), scale=(0.3, 2.5),
                                                  shear=(-89, 89, -85, 85), fill=77)), NEAREST),
    "affine v2 extremes, white fill": (
        _v2(v2.RandomAffine((179, 180), translate=(0.45, 0.05), scale=(2.4, 2.5), shear=(88, 89.9),
                            fill=255)),
        NEAREST),
    "rotation about a corner, fill": (_v1(v1.RandomRotation(180, center=(0, 27), fill=3)), NEAREST),
    "affine extremes, bilinear, fill": (
        _v1(v1.RandomAffine(180, translate=(0.5, 0.5), scale=(0.3, 2.5), shear=(-89, 89, -85, 85),
                            interpolation=BILINEAR, fill=77)), BILINEAR),
    "affine v2 extremes, bilinear, white fill": (
        _v2(v2.RandomAffine((179, 180), translate=(0.45, 0.05), scale=(2.4, 2.5), shear=(88, 89.9),
                            interpolation=BILINEAR, fill=255)), BILINEAR),
    "rotation by quarter turns, bilinear v2": (_v2(v2.RandomRotation((-90, -90), interpolation=BILINEAR)),
                                               BILINEAR),
    "rotation about a corner, bilinear, fill": (
        _v1(v1.RandomRotation(180, center=(0, 27), interpolation=BILINEAR, fill=3)), BILINEAR),
    "crop": (_v1(v1.RandomCrop(28, padding=2)), NEAREST),
    "crop v2, uneven padding, fill": (_v2(v2.RandomCrop(28, padding=[1, 3, 2, 0], fill=9)), NEAREST),
    "crop, padding wider than the image": (_v1(v1.RandomCrop(28, padding=(30, 3, 0, 40), fill=5)), NEAREST),
    "crop, padding on the right and bottom only": (_v1(v1.RandomCrop(28, padding=(0, 0, 3, 5), fill=1)),
                                                   NEAREST),
    "perspective": (_v1(v1.RandomPerspective(0.5, p=0.7)), BILINEAR),
    "perspective nearest v2": (_v2(v2.RandomPerspective(0.4, p=1.0, interpolation=NEAREST)), NEAREST),
    "elastic": (_v1(v1.ElasticTransform(alpha=34.0, sigma=4.0)), BILINEAR),
    "elastic nearest v2": (_v2(v2.ElasticTransform(alpha=50.0, sigma=5.0, interpolation=NEAREST)), NEAREST),
    "perspective extremes, bilinear, white fill": (_v1(v1.RandomPerspective(1.0, p=1.0, fill=255)), BILINEAR),
    "perspective extremes, nearest v2, fill": (
        _v2(v2.RandomPerspective(0.95, p=0.9, interpolation=NEAREST, fill=77)), NEAREST),
    "elastic, the widest blur, uneven, fill": (
        _v1(v1.ElasticTransform(alpha=(20.0, 90.0), sigma=(6.7, 1.5), fill=200)), BILINEAR),
    "elastic v2, strong, nearest, fill": (
        _v2(v2.ElasticTransform(alpha=(250.0, 10.0), sigma=(0.5, 6.0), interpolation=NEAREST, fill=3)),
        NEAREST),
    "erasing": (_v1(erase=[v1.RandomErasing(p=0.8)]), None),
    "erasing v2, a value": (_v2(erase=[v2.RandomErasing(p=1.0, scale=(0.05, 0.4), value=1.5)]), None),
    "affine then erasing": (
        _v1(v1.RandomAffine(10, translate=(0.1, 0.1)), erase=[v1.RandomErasing(p=0.5)]),
        NEAREST,
    ),
}


def _replay(image: torch.Tensor, step: dict, interpolation, fill: float) -> torch.Tensor:
    """torchvision's functional op of one step on one uint8 ``(1, 28, 28)`` image."""
    kind = step["transform"]
    if kind == "RandomAffine":
        return F.affine(
            image,
            angle=float(step["angle"]),
            translate=[int(v) for v in step["translate"]],
            scale=float(step["scale"]),
            shear=[float(v) for v in step["shear"]],
            interpolation=interpolation,
            fill=fill,
            center=step["center"],
        )
    if kind == "RandomRotation":
        return F.rotate(
            image, float(step["angle"]), interpolation=interpolation, center=step["center"], fill=fill
        )
    if kind == "RandomCrop":
        left, top, right, bottom = step["padding"]
        padded = F.pad(image, [left, top, right, bottom], fill=fill)
        return F.crop(padded, int(step["top"]), int(step["left"]), 28, 28)
    if kind == "RandomPerspective":
        if not step["applied"]:
            return image
        start = [[0, 0], [27, 0], [27, 27], [0, 27]]
        return F.perspective(image, start, step["endpoints"].tolist(), interpolation=interpolation, fill=fill)
    assert kind == "ElasticTransform"
    return F.elastic(image, step["displacement"][None], interpolation=interpolation, fill=fill)


def _case_details(transform) -> dict:
    """What the reference needs of the geometric step: fill, center, padding; scaling."""
    steps = transform.transforms
    geometric = [
        t
        for t in steps
        if type(t).__name__ not in ("ToTensor", "ToImage", "ToDtype", "Normalize", "RandomErasing")
    ]
    details = {
        "reciprocal": any(type(t).__name__ == "ToDtype" for t in steps),
        "fill": 0.0,
        "center": None,
        "padding": None,
        "erase": next((t for t in steps if type(t).__name__ == "RandomErasing"), None),
    }
    if geometric:
        t = geometric[0]
        fill = t.fill if not isinstance(t.fill, dict) else next(iter(t.fill.values()))
        details["fill"] = float(fill[0] if isinstance(fill, (list, tuple)) else fill)
        details["center"] = getattr(t, "center", None)
        if type(t).__name__ == "RandomCrop":
            pad = t.padding
            details["padding"] = (
                [pad] * 4
                if isinstance(pad, int)
                else [pad[0], pad[2], pad[1], pad[3]]
                if isinstance(t, v2.RandomCrop)
                else list(pad)
            )
    return details


GEOMETRIC = ("RandomAffine", "RandomRotation", "RandomCrop", "RandomPerspective", "ElasticTransform")
FUSED = [name for name, (t, mode) in CASES.items()  # one kernel from uint8 to normalised (kernels.py)
         if any(type(s).__name__ in GEOMETRIC for s in t.transforms)]


@pytest.mark.parametrize("name, jit", [(name, True) for name in CASES] + [(name, False) for name in FUSED])
def test_same_parameters_same_pixels_as_torchvision(real_shards, real_root, name, jit, monkeypatch):
    """256 real test digits through the loader, each equal to torchvision's functional op
    with the reported parameters, then its float conversion and Normalize (and erase): bit
    for bit, bilinear included (the same float32 grid, then grid_sample itself); the
    geometric steps both through the fused kernels (numba, required in CI) and the torch path
    (``FASTMNIST_JIT=0``)."""
    transform, interpolation = CASES[name]
    monkeypatch.setenv("FASTMNIST_JIT", "1" if jit else "0")
    kernels.available.cache_clear()
    if jit and name in FUSED and not os.environ.get("CI"):
        pytest.importorskip("numba")
    loader = FastMNISTLoader(real_shards, "test", batch_size=256, shuffle=False, seed=11, transform=transform)
    kernels.available.cache_clear()
    assert (loader._delivery.finish.fused is not None) == (jit and name in FUSED)
    x, _ = next(iter(loader))
    images = torch.from_numpy(read_images(real_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")[:256])
    params = loader.augmentation_params(0, torch.arange(256))
    details = _case_details(transform)
    for i in range(256):
        image = images[i]
        for step in params:
            if step["transform"] != "RandomErasing":
                row = {k: (v[i] if isinstance(v, torch.Tensor) else v) for k, v in step.items()}
                row.update(center=details["center"], padding=details["padding"])
                image = _replay(image, row, interpolation, details["fill"])
        scaled = (
            F.to_dtype(image, torch.float32, scale=True) if details["reciprocal"] else image.float().div(255)
        )
        ref = F.normalize(scaled, [MEAN], [STD])
        for step in params:
            if step["transform"] == "RandomErasing" and step["h"][i] > 0:
                ref = F.erase(
                    ref,
                    int(step["i"][i]),
                    int(step["j"][i]),
                    int(step["h"][i]),
                    int(step["w"][i]),
                    torch.tensor(
                        float(
                            details["erase"].value
                            if not isinstance(details["erase"].value, (list, tuple))
                            else details["erase"].value[0]
                        )
                    ),
                )
        assert torch.equal(x[i], ref), (name, i, ((x[i] - ref).abs() * STD * 255).max().item())


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(
        np.abs(
            np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)
        ).max()
    )


def _critical(n: int, m: int, alpha: float = 1e-3) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


DRAWS = 100_000


def _torchvision_draws(transform, count: int) -> list[dict]:
    torch.manual_seed(0)
    dummy = torch.zeros(1, 28, 28, dtype=torch.uint8)
    return [transform.make_params([dummy]) for _ in range(count)]


def test_affine_parameters_follow_torchvision(indexed_shards):
    """100,000 draws of RandomAffine's angle, translations, scale and shears against
    torchvision's own ``make_params``: KS at a fixed seed for the continuous ones, the
    frequency of every integer translation within 1 point, both ends of each range reached."""
    t = v2.RandomAffine(20, translate=(0.1, 0.2), scale=(0.8, 1.2), shear=(-10, 10, -5, 5))
    ours = FastMNISTLoader(indexed_shards, transform=_v2(t), seed=3).augmentation_params(0, np.arange(DRAWS))[
        0
    ]
    theirs = _torchvision_draws(t, DRAWS)
    columns = {
        "angle": (ours["angle"], [p["angle"] for p in theirs], (-20, 20)),
        "scale": (ours["scale"], [p["scale"] for p in theirs], (0.8, 1.2)),
        "shear x": (ours["shear"][:, 0], [p["shear"][0] for p in theirs], (-10, 10)),
        "shear y": (ours["shear"][:, 1], [p["shear"][1] for p in theirs], (-5, 5)),
    }
    for name, (mine, reference, (low, high)) in columns.items():
        mine = mine.numpy().astype(np.float64)
        assert _ks(mine, np.array(reference)) < _critical(DRAWS, DRAWS), name
        assert mine.min() < low + 0.01 * (high - low) and mine.max() > high - 0.01 * (high - low), name
    for k, limit in ((0, 3), (1, 6)):
        mine = np.bincount(ours["translate"][:, k].numpy() + limit, minlength=2 * limit + 1) / DRAWS
        reference = (
            np.bincount(np.array([p["translate"][k] for p in theirs]) + limit, minlength=2 * limit + 1)
            / DRAWS
        )
        assert np.abs(mine - reference).max() < 0.01 and mine[0] > 0 and mine[-1] > 0


def test_elastic_displacements_follow_torchvision(indexed_shards):
    """ElasticTransform's displacement field: at the centre, an edge and a corner pixel,
    each component over 3,000 samples against 3,000 of torchvision's ``make_params`` (KS);
    the field is smooth as torchvision's blur makes it (neighbours correlated alike)."""
    t = v2.ElasticTransform(alpha=40.0, sigma=4.0)
    count = 3000
    ours = FastMNISTLoader(indexed_shards, transform=_v2(t)).augmentation_params(2, np.arange(count))[0]
    mine = ours["displacement"].numpy()
    theirs = np.concatenate([p["displacement"].numpy() for p in _torchvision_draws(t, count)])
    for y, x in ((14, 14), (0, 13), (27, 27)):
        for c in (0, 1):
            assert _ks(mine[:, y, x, c], theirs[:, y, x, c]) < _critical(count, count), (y, x, c)

    def neighbour_correlation(d):
        return np.corrcoef(d[:, 14, 14, 0], d[:, 14, 15, 0])[0, 1]

    assert abs(neighbour_correlation(mine) - neighbour_correlation(theirs)) < 0.05


@pytest.mark.parametrize("sigma", [(4.0, 4.0), (2.0, 5.0), (6.0, 0.5)])
def test_elastic_blur_is_torchvisions_for_the_same_noise(indexed_shards, sigma):
    """The displacement field from the loader's own uniform noise, against torchvision's
    ``make_params`` blur of that noise (``gaussian_blur`` with this axis's kernel size and
    both sigmas, then alpha / 28): equal to float32 rounding, unequal sigmas included."""
    alpha, seed, count = (30.0, 45.0), 5, 16
    loader = FastMNISTLoader(indexed_shards, seed=seed, transform=_v2(v2.ElasticTransform(alpha, sigma)))
    (step,) = loader.augmentation_params(1, np.arange(count))
    noise = torch.from_numpy(uniforms(seed, 1, 0, np.arange(count), 2 * 28 * 28).astype(np.float32))
    noise = noise.reshape(count, 2, 1, 28, 28) * 2 - 1
    for axis in (0, 1):
        size = int(8 * sigma[axis] + 1) + (int(8 * sigma[axis] + 1) % 2 == 0)
        field = torch.cat([F.gaussian_blur(noise[i, axis], [size, size], list(sigma)) for i in range(count)])
        expected = field * alpha[axis] / 28
        assert torch.allclose(step["displacement"][..., axis], expected, atol=1e-6), axis


def test_crop_rotation_perspective_and_erasing_parameters_follow_torchvision(indexed_shards):
    """RandomCrop's offsets, RandomRotation's angle, RandomPerspective's corners (through the
    8 coefficients torchvision solves from them) and RandomErasing's rectangles, 100,000 of
    ours against 20,000 of torchvision's ``make_params``."""
    transform = _v2(
        v2.RandomCrop(28, padding=3),
        v2.RandomRotation((-30, 45)),
        v2.RandomPerspective(0.6, p=0.3),
        erase=[v2.RandomErasing(p=0.6)],
    )
    crop, rotation, perspective, erasing = FastMNISTLoader(
        indexed_shards, transform=transform
    ).augmentation_params(4, np.arange(DRAWS))
    steps, count = transform.transforms, 20_000
    critical = _critical(DRAWS, count)
    theirs = _torchvision_draws(steps[1], count)
    for key in ("top", "left"):
        mine = np.bincount(crop[key].numpy(), minlength=7) / DRAWS
        assert len(mine) == 7 and mine.min() > 0
        assert np.abs(mine - np.bincount([p[key] for p in theirs], minlength=7) / count).max() < 0.015, key
    angle = rotation["angle"].numpy()
    assert _ks(angle, np.array([p["angle"] for p in _torchvision_draws(steps[2], count)])) < critical
    assert angle.min() < -29.9 and angle.max() > 44.9
    assert abs(perspective["applied"].float().mean().item() - 0.3) < 0.01  # torchvision: rand(1) < p
    mine = _perspective_coefficients(perspective["endpoints"][:count]).numpy()
    reference = np.array([p["coefficients"] for p in _torchvision_draws(steps[3], count)])
    for k in range(8):
        assert _ks(mine[:, k], reference[:, k]) < _critical(count, count), f"coefficient {k}"
    bound = int(0.6 * 14) + 1  # torchvision's corner offsets: 0 .. bound - 1 from each edge
    corners = perspective["endpoints"].reshape(-1, 8).numpy()
    for k in range(8):
        values = np.minimum(corners[:, k], 27 - corners[:, k])
        assert set(np.unique(values)) == set(range(bound)), k
    theirs = _torchvision_draws(steps[-1], count)
    fitted = [p for p in theirs if p["v"] is not None]
    erased = erasing["h"].numpy() > 0
    assert abs(erased.mean() - 0.6 * len(fitted) / count) < 0.015  # applied with p, when a box fits
    for key in ("h", "w", "i", "j"):
        mine = erasing[key].numpy()[erased].astype(float)
        assert _ks(mine, np.array([p[key] for p in fitted], float)) < _critical(len(mine), len(fitted)), key


def _indexed_real(tmp_path_factory, real_root):
    """Two sets of ``N`` samples in the same order: real test digits, and images encoding
    their index (a loader over the second tells which samples a batch of the first holds)."""
    root = tmp_path_factory.mktemp("aug_sets")
    digits = read_images(real_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")[:N, 0]
    labels = read_labels(real_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz")[:N]
    for name, images in (("real", digits), ("indexed", indexed_images(N))):
        write_split(root / name, "train", images, labels)
        write_split(root / name, "test", images[:10], labels[:10])
        convert(root / name, root / f"{name}-set", progress=False)
    return root / "real-set", root / "indexed-set"


@pytest.fixture(scope="module")
def paired_sets(tmp_path_factory, real_root):
    return _indexed_real(tmp_path_factory, real_root)


TRANSFORM = _v1(
    v1.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
    v1.RandomCrop(28, padding=2),
    erase=[v1.RandomErasing(p=0.5)],
)


def _by_sample(batches, index_batches) -> dict[int, bytes]:
    out = {}
    for (x, _), (ix, _) in zip(batches, index_batches, strict=True):
        for sample, image in zip(decode_indices(ix), x, strict=True):
            out.setdefault(sample, []).append(image.numpy().tobytes())
    return out


def test_a_sample_gets_the_same_bytes_whatever_the_run(paired_sets):
    """Epoch 1's augmented bytes of every sample: the same at batch sizes 1, 64 and 1000,
    on 1, 2 and 3 ranks, with 2 DataLoader workers, resident, and resumed mid-epoch on
    another world size."""
    real, indexed = paired_sets

    def run(world, batch, workers=0, **kw):
        seen = {}
        for rank in range(world):
            pair = [
                FastMNISTLoader(s, batch_size=batch, seed=5, rank=rank, world_size=world, **kw, **extra)
                for s, extra in ((real, {"transform": TRANSFORM}), (indexed, {"normalize": False}))
            ]
            for loader in pair:
                loader.set_epoch(1)
            if workers:
                pair = [DataLoader(loader, batch_size=None, num_workers=workers) for loader in pair]
            for sample, images in _by_sample(*pair).items():
                seen.setdefault(sample, []).extend(images)
        return seen

    reference = run(1, 1000)
    assert sorted(reference) == list(range(N)) and all(len(v) == 1 for v in reference.values())
    for config in (
        {"world": 1, "batch": 1},
        {"world": 2, "batch": 64},
        {"world": 3, "batch": 64},
        {"world": 1, "batch": 64, "workers": 2},
        {"world": 1, "batch": 64, "resident": True},
    ):
        seen = run(**config)
        assert set(seen) == set(reference), config
        for sample, images in seen.items():
            assert set(images) == set(reference[sample]), (config, sample)  # padding repeats are identical

    # stopped after 5 batches on 2 ranks, resumed on 3: every sample's bytes as in the reference
    pairs = [
        [
            FastMNISTLoader(s, batch_size=64, seed=5, rank=r, world_size=2, **extra)
            for s, extra in ((real, {"transform": TRANSFORM}), (indexed, {"normalize": False}))
        ]
        for r in range(2)
    ]
    seen, states = {}, []
    for pair in pairs:
        for loader in pair:
            loader.set_epoch(1)
        its = [iter(loader) for loader in pair]
        for _ in range(5):
            (x, _), (ix, _) = next(its[0]), next(its[1])
            for sample, image in zip(decode_indices(ix), x, strict=True):
                seen.setdefault(sample, set()).add(image.numpy().tobytes())
        states.append([loader.state_dict() for loader in pair])
    for rank in range(3):
        resumed = [
            FastMNISTLoader(s, batch_size=64, seed=5, rank=rank, world_size=3, **extra)
            for s, extra in ((real, {"transform": TRANSFORM}), (indexed, {"normalize": False}))
        ]
        for loader, state in zip(resumed, states[0], strict=True):
            loader.load_state_dict(state)
        for sample, images in _by_sample(*resumed).items():
            seen.setdefault(sample, set()).update(images)
    assert sorted(seen) == list(range(N))
    for sample, images in seen.items():
        assert images == set(reference[sample]), sample


@pytest.mark.parametrize("step", [v1.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                                  v1.RandomAffine(15, scale=(0.8, 1.2), interpolation=BILINEAR, fill=40),
                                  v1.RandomRotation(30), v1.RandomCrop(28, padding=4),
                                  v1.RandomPerspective(0.5, p=0.5), v1.ElasticTransform(40.0, 4.0)], ids=repr)
def test_the_fused_kernels_read_each_sample_where_it_lies(paired_sets, step, monkeypatch):
    """Shuffled, the fused kernel (reading each sample from the mapped set, or from the
    joined arrays of a mixture) gives every batch of the torch path (``FASTMNIST_JIT=0``),
    also resident, in DataLoader workers and in a mixture."""
    if not os.environ.get("CI"):
        pytest.importorskip("numba")
    real, _ = paired_sets
    transform = _v1(step)

    def batches(jit: bool, workers=0, **kw):
        monkeypatch.setenv("FASTMNIST_JIT", "1" if jit else "0")
        kernels.available.cache_clear()
        loader = FastMNISTLoader(real, batch_size=64, seed=5, transform=transform, **kw)
        kernels.available.cache_clear()
        assert (loader._delivery.finish.fused is not None) == jit
        loader.set_epoch(1)
        return list(DataLoader(loader, batch_size=None, num_workers=workers) if workers else loader)

    for kw in ({}, {"resident": True}, {"workers": 2}, {"mix_with": [(real, "test")]}):
        reference = batches(False, **kw)
        fused = batches(True, **kw)
        assert len(fused) == len(reference) > 10
        for (x, y), (rx, ry) in zip(fused, reference, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry), kw


NOISE_STEPS = [v1.RandomAffine(180, translate=(0.3, 0.3), scale=(0.5, 2.0), shear=(-40, 40, -30, 30), fill=9),
               v1.RandomAffine(180, translate=(0.3, 0.3), scale=(0.5, 2.0), shear=30, interpolation=BILINEAR,
                               fill=200),
               v1.RandomRotation(90), v1.RandomRotation((90, 90), interpolation=BILINEAR),
               v1.RandomCrop(28, padding=(3, 0, 5, 2), fill=17),
               v1.RandomPerspective(0.8, p=0.7, fill=5),
               v1.RandomPerspective(0.8, p=0.7, interpolation=NEAREST),
               v1.ElasticTransform(60.0, 3.0, fill=30), v1.ElasticTransform(60.0, 3.0, interpolation=NEAREST)]


@pytest.mark.parametrize("step", NOISE_STEPS, ids=repr)
def test_the_fused_kernels_equal_the_torch_path_on_noise(step):
    """Real digits are 0 at their borders; noise is not: 2,048 images of random bytes (every
    border pixel set) through each fused kernel equal the torch path's output (proven against
    torchvision above) bit for bit, each step's extremes, both modes, every fill."""
    if not os.environ.get("CI"):
        pytest.importorskip("numba")
    augment = parse(_v1(step), MEAN, STD, seed=3)
    assert augment.fusable(torch.device("cpu"))
    noise = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2048, 1, 28, 28), dtype=torch.uint8, generator=noise)
    indices, out = torch.arange(2048) * 3, torch.empty(2048, 1, 28, 28)
    fused = augment.images_normalised(images, 5, indices, kernels.norm(MEAN, STD, False), out)
    reference = augment.images(images, augment.params(5, indices))
    reference = ((reference.float() / 255) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.equal(fused, reference)


@pytest.mark.parametrize("step", [v1.RandomAffine(20, scale=(0.8, 1.2)),
                                  v1.RandomAffine(20, interpolation=BILINEAR, fill=9),
                                  v1.RandomPerspective(0.6, p=0.5), v1.ElasticTransform(30.0, 3.0)], ids=repr)
def test_the_fused_kernels_give_the_same_bytes_on_any_number_of_threads(real_shards, step):
    """A kernel's samples are divided among torch's threads: a 1,000-sample group on 1, 2
    and 3 threads (uneven shares) gives the same bytes, which differ from sample to sample."""
    if not os.environ.get("CI"):
        pytest.importorskip("numba")
    loader = FastMNISTLoader(real_shards, "test", batch_size=1000, seed=4, transform=_v1(step))
    finish, (images, _) = loader._delivery.finish, loader.source.tensors
    assert finish.fused is not None
    idx, threads = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:1000], \
        torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outs.append(finish.from_source(images, idx, 2, torch.empty(1000, 1, 28, 28)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert len({x.numpy().tobytes() for x in outs[0]}) == 1000


@pytest.mark.parametrize("distortion", [0.1, 0.5, 1.0])
def test_certain_perspective_coefficients_are_gels(distortion):
    """The fused path's perspective coefficients (exact, then made float32) where certain,
    against torch's gels, as torchvision solves them, on 30,000 random end points of
    torchvision's ranges: equal wherever certain; certain for most (but where a coefficient
    is exactly 0, which gels misses by a few roundings, never)."""
    if not os.environ.get("CI"):
        pytest.importorskip("numba")
    rng = np.random.default_rng(int(distortion * 10))
    (step,) = parse(_v2(v2.RandomPerspective(distortion, p=1.0)), MEAN, STD, seed=0).geometric
    ends = step.params(lambda draws: rng.random((30_000, draws)))["endpoints"].numpy()
    mine, certain = kernels.perspective_coefficients(ends, _perspective_system(ends))
    gels = _perspective_coefficients(torch.from_numpy(ends[certain])).numpy()
    assert np.array_equal(mine[certain], gels)
    assert certain.mean() > {0.1: 0.1, 0.5: 0.6, 1.0: 0.6}[distortion]
    assert not (certain & (mine == 0).any(1)).any()


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("f", [1.0, 0.1, 3e-20, 2.5e30])
def test_the_room_to_a_float32_rounding_boundary(f, sign):
    """The certificate's distance from a float64 to where its float32 rounding changes:
    just inside each of the two boundaries around a float32 (the one below a power of two
    nearer), and at the float32 itself."""
    if not os.environ.get("CI"):
        pytest.importorskip("numba")
    from fastmnist.loading.numba_kernels import rounding_room

    single = np.empty(1, np.float32)
    single32 = np.float32(sign * f)
    f = float(single32)
    up, down = np.nextafter(single32, np.float32(np.inf)), np.nextafter(single32, np.float32(-np.inf))
    above, below = (f + float(up)) / 2, (f + float(down)) / 2
    step = abs(f) * 2.0 ** -40
    for x, room in ((above - step, step), (below + step, step), (f, min(above - f, f - below))):
        assert np.float32(x) == single32
        assert rounding_room(x, single, single.view(np.int32)) == pytest.approx(room, rel=1e-3)


def test_the_next_epoch_draws_new_parameters(indexed_shards):
    loader = FastMNISTLoader(indexed_shards, transform=TRANSFORM)
    first, second = (loader.augmentation_params(e, np.arange(100))[0]["angle"] for e in (0, 1))
    assert not torch.equal(first, second)
    assert torch.equal(
        first,
        FastMNISTLoader(indexed_shards, transform=TRANSFORM).augmentation_params(0, np.arange(100))[0][
            "angle"
        ],
    )


@pytest.mark.parametrize(
    "transform, message",
    [
        (_v1(v1.ColorJitter(0.5)), "ColorJitter cannot be replayed per sample; supported: RandomAffine"),
        (v1.Compose([v1.RandomHorizontalFlip(), v1.ToTensor()]), "RandomHorizontalFlip cannot be replayed"),
        (
            v1.Compose([v1.ToTensor(), v1.Normalize((0.5,), (0.5,))]),
            "normalises with mean (0.5,), std (0.5,), but the set",
        ),
        (v1.Compose([v1.RandomAffine(10), v1.ToTensor()]), "must convert to float and Normalize"),
        (v1.Compose([v1.ToTensor(), v1.RandomAffine(10), v1.Normalize((MEAN,), (STD,))]), "after ToTensor"),
        (_v1(v1.RandomAffine(10, interpolation=v1.InterpolationMode.BICUBIC)), "interpolation 'bicubic'"),
        (_v1(v1.RandomRotation(10, expand=True)), "expand=True"),
        (_v1(erase=[v1.RandomErasing(value="random")]), "value='random' is not supported"),
        (
            v2.Compose([v2.ToImage(), v2.ToDtype(torch.float16, scale=True), v2.Normalize([MEAN], [STD])]),
            "ToDtype(torch.float32, scale=True)",
        ),
    ],
)
def test_refusals_name_the_transform(indexed_shards, transform, message):
    with pytest.raises(FastMNISTError) as caught:
        FastMNISTLoader(indexed_shards, transform=transform)
    assert message in str(caught.value)


def test_a_set_converted_with_another_normalisation_refuses_the_usual_transform(tmp_path, indexed_shards):
    root = tmp_path / "raw"
    write_split(root, "train", indexed_images(50), np.arange(50) % 10)
    convert(root, tmp_path / "set", mean=0.5, std=0.25, progress=False)
    with pytest.raises(FastMNISTError, match=r"converted with mean 0.5, std 0.25"):
        FastMNISTLoader(tmp_path / "set", transform=_v1(v1.RandomAffine(5)))
    with pytest.raises(FastMNISTError, match="needs normalize=True"):
        FastMNISTLoader(indexed_shards, transform=_v1(v1.RandomAffine(5)), normalize=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available here")
def test_augmented_on_the_gpu_equals_the_cpu(paired_sets):
    """Nearest-neighbour steps and erasing run on the device from the uint8 batches: the same
    bytes as on the CPU (elementwise float32 arithmetic and a gather round alike there)."""
    real, _ = paired_sets
    tf = _v1(
        v1.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        v1.RandomCrop(28, padding=2),
        erase=[v1.RandomErasing(p=0.5)],
    )
    for device_loader in (
        FastMNISTLoader(real, batch_size=256, seed=3, transform=tf, device="cuda"),
        FastMNISTLoader(real, batch_size=256, seed=3, transform=tf, device="cuda", resident=True),
    ):
        cpu = FastMNISTLoader(real, batch_size=256, seed=3, transform=tf)  # epoch 0 of each, compared
        for (x, y), (cx, cy) in zip(device_loader, cpu, strict=True):
            assert torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)


def _torchvision_batch(root, transform, count=64) -> torch.Tensor:
    """torchvision's own ``MNIST(train=False, transform=transform)``: its first ``count`` images."""
    dataset = torchvision.datasets.MNIST(root, train=False, transform=transform)
    return torch.stack([dataset[i][0] for i in range(count)])


def test_a_fill_by_input_type_is_the_one_torchvision_picks(real_shards, torchvision_test_root):
    """v2's ``fill={tv_tensors.Image: 128, "others": 0}``: after ``ToImage`` the step sees an
    Image and fills 128; before it, a PIL image, and fills from "others". Fixed angles, so
    torchvision's own dataset pipeline is the reference: bit for bit on tensors; on PIL
    images (another kernel) the corners, which are fill only."""
    by_type = {tv_tensors.Image: 128, "others": 0}
    on_tensors = _v2(v2.RandomAffine((30, 30), fill=by_type))
    loader = FastMNISTLoader(real_shards, "test", batch_size=64, shuffle=False, transform=on_tensors)
    x, _ = next(iter(loader))
    assert torch.equal(x, _torchvision_batch(torchvision_test_root, on_tensors))
    assert torch.allclose(x[:, :, 0, 0], torch.tensor((128 / 255 - MEAN) / STD))
    for fill in ({PIL.Image.Image: 77, "others": 5}, {tv_tensors.Image: 5, "others": 77}):
        on_pil = v2.Compose([v2.RandomAffine((45, 45), fill=fill), v2.ToImage(),
                             v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN], [STD])])
        loader = FastMNISTLoader(real_shards, "test", batch_size=64, shuffle=False, transform=on_pil)
        x, _ = next(iter(loader))
        reference = _torchvision_batch(torchvision_test_root, on_pil)
        corners = (slice(None), slice(None), [0, 0, -1, -1], [0, -1, 0, -1])
        assert torch.equal(x[corners], reference[corners])
        assert torch.allclose(x[corners], torch.tensor((77 / 255 - MEAN) / STD))


@pytest.mark.parametrize("given", [(MEAN, STD), (torch.tensor(MEAN), torch.tensor(STD)),
                                   (torch.tensor([MEAN]), torch.tensor([STD]))])
def test_normalize_with_plain_numbers_is_normalize_with_sequences(real_shards, torchvision_test_root, given):
    """``Normalize`` given numbers or float32 tensors, as torchvision takes them: the same bits."""
    plain = v1.Compose([v1.ToTensor(), v1.Normalize(*given)])
    x, _ = next(iter(FastMNISTLoader(real_shards, "test", batch_size=64, shuffle=False, transform=plain)))
    assert torch.equal(x, _torchvision_batch(torchvision_test_root, plain))


class RandomAffine(v2.RandomAffine):
    """Named as torchvision's, but its forward flips the image: not what the loader replays."""

    def forward(self, *inputs):
        return F.horizontal_flip(inputs[0])


class LooksLikeCompose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image):
        return image


@pytest.mark.parametrize("transform, message", [
    (_v2(RandomAffine(10)), "tests.test_augment.RandomAffine is not torchvision's RandomAffine"),
    (LooksLikeCompose(_v1().transforms), "LooksLikeCompose cannot be replayed per sample"),
])
def test_a_transform_is_replayed_for_what_it_is_not_for_its_name(indexed_shards, transform, message):
    with pytest.raises(FastMNISTError, match=message):
        FastMNISTLoader(indexed_shards, transform=transform)


@pytest.mark.parametrize("interpolation", [NEAREST, BILINEAR])
@pytest.mark.parametrize("jit", [True, False])
def test_a_perspective_that_divides_by_0_is_torchvisions(real_shards, real_root, interpolation, jit,
                                                         monkeypatch):
    """``RandomPerspective(0.9)`` puts, for some samples, pixels where the grid's denominator
    is 0 (infinite or NaN coordinates, which grid_sample takes as outside): 69 of the 10,000
    test digits at seed 0, 9 of them 0 / 0. Each of those, and the first 100, equal torchvision's
    ``F.perspective`` with the reported end points, bit for bit: through the fused kernel and
    the torch path."""
    if jit and not os.environ.get("CI"):
        pytest.importorskip("numba")
    monkeypatch.setenv("FASTMNIST_JIT", "1" if jit else "0")
    kernels.available.cache_clear()
    transform = _v2(v2.RandomPerspective(0.9, p=1.0, interpolation=interpolation))
    loader = FastMNISTLoader(real_shards, "test", batch_size=2500, shuffle=False, seed=0, transform=transform)
    kernels.available.cache_clear()
    assert (loader._delivery.finish.fused is not None) == jit
    x = torch.cat([x for x, _ in loader])
    (step,) = loader.augmentation_params(0, torch.arange(len(x)))
    gx, gy = _perspective_grid(_perspective_coefficients(step["endpoints"]), "cpu")
    degenerate = (~gx.isfinite() | ~gy.isfinite()).flatten(1).any(1)
    assert (gx.isnan() | gy.isnan()).flatten(1).any(1).sum() > 0  # 0 / 0 among them
    images = torch.from_numpy(read_images(real_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"))
    for i in sorted({*degenerate.nonzero().flatten().tolist(), *range(100)}):
        row = {"transform": "RandomPerspective", "applied": True, "endpoints": step["endpoints"][i]}
        replayed = _replay(images[i], row, interpolation, 0.0)
        reference = F.normalize(F.to_dtype(replayed, torch.float32, scale=True), [MEAN], [STD])
        assert torch.equal(x[i], reference), (i, bool(degenerate[i]))


def test_the_torchvision_comparisons_hold_on_the_default_cpu_kernels(real_shards):
    """Bilinear resampling rounds differently on torch's default (non-AVX2) CPU kernels than
    on AVX2/AVX512 ones: every step compared with torchvision again, in a process whose torch
    runs the default kernels (``ATEN_CPU_CAPABILITY=default``), where both sides use them."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "same_parameters",
               "tests/test_augment.py"]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600,  # no -q: the header
                          env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})  # says which kernels ran
    assert done.returncode == 0, done.stdout[-3000:]
    assert "cpu capability: DEFAULT" in done.stdout and " passed" in done.stdout


@pytest.mark.parametrize("row", [-1, 10])
def test_a_row_outside_the_images_is_refused_before_the_kernel_runs(row):
    """The kernels read without bounds checks, so their entry checks each sample's row."""
    if not os.environ.get("CI"):
        pytest.importorskip("numba")
    images, out = np.zeros((10, 28, 28), np.uint8), np.full((2, 28, 28), 7.0, np.float32)
    config = np.zeros(17)
    config[1:3] = 0.0, 10.0
    with pytest.raises(IndexError, match=f"affine: rows {min(row, 3)}..{max(row, 3)} outside the 10 images"):
        kernels.affine(images, np.array([3, row]), np.array([0, 1]), np.uint64(1), config,
                       np.linspace(-13.5, 13.5, 28, dtype=np.float32), 0, kernels.NEAREST,
                       kernels.norm(MEAN, STD, False), False, out)
    assert (out == 7.0).all()  # nothing written


def test_the_fused_kernels_stay_in_bounds(real_shards, tmp_path):
    """The kernels run without bounds checks; compiled with them (``NUMBA_BOUNDSCHECK=1``, a
    cache of their own), every fused case of the torchvision comparison passes again: no
    index outside an array, which unchecked would read or write neighbouring memory."""
    import subprocess
    import sys
    from pathlib import Path

    if not os.environ.get("CI"):
        pytest.importorskip("numba")
    kinds = ("affine", "rotation", "crop", "perspective", "elastic")  # the fused cases' names
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
               f"same_parameters and True and ({' or '.join(kinds)})", "tests/test_augment.py"]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "NUMBA_BOUNDSCHECK": "1",
                                            "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")})
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"{sum(any(kind in n for kind in kinds) for n in CASES)} passed" in done.stdout
