"""Augmentation: the user's torchvision transform, replayed per sample and batched.

:func:`parse` reads a torchvision transform (v1 or v2, a ``Compose`` or one transform) into
an :class:`Augment`: the random geometric steps applied to the uint8 images (``RandomAffine``,
``RandomRotation``, ``RandomCrop``, ``RandomPerspective``, ``ElasticTransform``), the
conversion to float (``ToTensor``, or ``ToImage``/``PILToTensor`` then ``ToDtype(float32,
scale=True)``) and ``Normalize``, which must be the set's own, then ``RandomErasing`` on the
normalised tensor. Anything else is refused, naming it.

Every random parameter is a pure function of (seed, epoch, sample index, step, draw): a
counter-based generator (a SplitMix64 hash of those numbers), so sample ``i`` of epoch ``e``
gets the same augmentation whatever the batch size, world size, worker count, device or
resume point. Parameters follow the distributions torchvision's own ``make_params`` draws
from. Images are resampled as torchvision's tensor kernels do (the same float32 grid, the
same rounding), all samples of a batch at once: nearest-neighbour as one gather of source
pixels, bilinear through ``grid_sample``; a single geometric step on the CPU as one numba
kernel with the normalisation (``kernels.py``), where numba is installed.
"""

import functools

import numpy as np
import torch

from ..errors import FastMNISTError
from ..formats.idx import IMAGE_SIDE as SIDE
from . import kernels

SUPPORTED = ("Compose", "RandomAffine", "RandomRotation", "RandomCrop", "RandomPerspective",
             "ElasticTransform", "RandomErasing", "ToTensor", "ToImage", "PILToTensor", "ToDtype",
             "Normalize")
_MASK = (1 << 64) - 1


def uniforms(seed: int, epoch: int, step: int, indices, draws: int) -> np.ndarray:
    """float64 ``(len(indices), draws)`` in [0, 1): draw ``d`` of step ``step`` for each
    sample index, a pure function of (seed, epoch, step, index, d)."""
    return keyed_uniforms(step_key(seed, epoch, step), indices, draws)


def keyed_uniforms(key: np.uint64, indices, draws: int) -> np.ndarray:
    """``uniforms`` of the step whose key (``step_key``) is ``key``."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    h = _mix(_mix(key ^ idx)[:, None] ^ np.arange(draws, dtype=np.uint64)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@functools.lru_cache(maxsize=64)  # one per group otherwise: 8.5 us of numpy on scalars
def step_key(seed: int, epoch: int, step: int) -> np.uint64:
    """The key of step ``step``'s draws in ``epoch``, from which ``uniforms`` draws."""
    key = _mix(np.uint64((seed & _MASK) ^ 0x5EED))
    key = _mix(key ^ np.uint64(epoch & _MASK))
    return _mix(key ^ np.uint64(step & _MASK))


def _mix(z):
    """SplitMix64's finaliser: uint64 -> uint64, every bit depending on every input bit."""
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(u: np.ndarray, low: float, high: float) -> np.ndarray:
    """float32 values of ``torch.empty(1).uniform_(low, high)``'s distribution, from ``u``."""
    return (low + (high - low) * u).astype(np.float32)


def _randint(u: np.ndarray, low: int, high: int) -> np.ndarray:
    """int64 values of ``torch.randint(low, high)``'s distribution (``high`` excluded)."""
    return np.minimum(low + np.floor(u * (high - low)).astype(np.int64), high - 1)


class Augment:
    """A parsed transform: ``geometric`` steps on uint8 images, then normalisation (the
    set's; ``reciprocal``: scaled as v2's ``ToDtype`` scales, by ``1 / 255``), then
    ``erasing`` steps on the normalised float32 images. ``seed`` keys every draw."""

    def __init__(self, geometric: list, erasing: list, seed: int, reciprocal: bool):
        self.geometric, self.erasing, self.seed, self.reciprocal = geometric, erasing, seed, reciprocal

    @property
    def steps(self) -> list:
        return [*self.geometric, *self.erasing]

    def params(self, epoch: int, indices, first: int = 0) -> list[dict]:
        """The parameters of every step (from step ``first`` on) for the samples ``indices``
        (int64) of ``epoch``: one dict per step, ``{"transform": name, ...}``, each value a CPU
        tensor with one row per sample (as ``FastMNISTLoader.augmentation_params`` returns them)."""
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu().numpy()
        return [{"transform": step.name, **step.params(
            lambda draws, n=number: uniforms(self.seed, epoch, n, indices, draws))}
            for number, step in enumerate(self.steps) if number >= first]

    def images(self, x: torch.Tensor, params: list[dict]) -> torch.Tensor:
        """uint8 ``(B, 1, 28, 28)`` images -> uint8, the geometric steps applied with their
        ``params`` (``params(epoch, indices)`` of those images)."""
        for step, p in zip(self.geometric, params[:len(self.geometric)], strict=True):
            x = step.apply(x, p)
        return x

    def fusable(self, device: torch.device) -> bool:
        """Whether ``images`` then the normalisation run as one kernel here: a single
        geometric step (bilinear where ``kernels.bilinear_rounding`` knows torch's rounding;
        an ``ElasticTransform`` whose blur torch can pad), on the CPU, with numba."""
        one = self.geometric[0] if len(self.geometric) == 1 else None
        return device.type == "cpu" and kernels.available() and one is not None and one.fusable()

    def images_normalised(self, x: torch.Tensor, epoch: int, indices, norm: np.ndarray,
                          out: torch.Tensor, whole: bool = False) -> torch.Tensor:
        """uint8 ``(B, 1, 28, 28)`` images of the samples ``indices`` (int64) of ``epoch`` ->
        float32 ``normalised(images(x, params))`` into ``out`` (same shape) in one kernel call,
        where ``fusable``: ``norm`` the normalisation (``kernels``' float32 ``(3,)``). With
        ``whole``, ``x`` is the whole source ``(N, 1, 28, 28)``, sample ``i`` its image ``i``:
        the kernel reads the samples where they lie."""
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu().numpy()
        b = len(indices)
        rows = indices if whole else np.arange(b)
        self.geometric[0].fused(x.reshape(len(x), SIDE, SIDE).numpy(), rows, indices,
                                step_key(self.seed, epoch, 0), norm, self.reciprocal,
                                out.view(b, SIDE, SIDE).numpy())
        return self.normalised(out, self.params(epoch, indices, first=1)) if self.erasing else out

    def normalised(self, x: torch.Tensor, params: list[dict]) -> torch.Tensor:
        """float32 normalised ``(B, 1, 28, 28)`` -> the erasing steps applied (in place) with
        the last ``len(erasing)`` of ``params``."""
        for step, p in zip(self.erasing, params[len(params) - len(self.erasing):], strict=True):
            x = step.apply(x, p)
        return x


def parse(transform, mean: float, std: float, seed: int) -> Augment:
    """The :class:`Augment` of a torchvision transform for a set normalised with
    ``mean``/``std``: geometric steps, then ``ToTensor`` (or ``ToImage``/``PILToTensor`` +
    ``ToDtype(float32, scale=True)``) and ``Normalize((mean,), (std,))``, then
    ``RandomErasing``. Raises ``FastMNISTError`` naming what it cannot replay."""
    import PIL.Image
    from torchvision import tv_tensors

    parts = list(transform.transforms) if _kind(transform) == "Compose" else [transform]
    geometric, erasing, stage, reciprocal = [], [], "uint8", False
    seen = PIL.Image.Image  # what the next step is given: the dataset's PIL image, until converted
    for t in parts:
        name = _kind(t)
        if name is None or name == "Compose":
            what = type(t).__name__
            if what in SUPPORTED and what != "Compose":
                what = (f"{type(t).__module__}.{type(t).__qualname__} is not torchvision's {what} (its "
                        f"forward may do anything else), so it")
            raise FastMNISTError(f"transform {t!r}: {what} cannot be replayed per sample; supported: "
                                 f"{', '.join(SUPPORTED[1:])} of torchvision (put other steps in your "
                                 f"training loop)")
        if name in ("ToImage", "PILToTensor"):
            seen = tv_tensors.Image if name == "ToImage" else torch.Tensor
            continue  # still uint8
        if name == "ToTensor" or name == "ToDtype":
            if name == "ToDtype" and not _to_scaled_float32(t):
                raise FastMNISTError(f"transform {t!r}: only ToDtype(torch.float32, scale=True) is supported")
            stage, reciprocal = "float", name == "ToDtype"
        elif name == "Normalize":
            if stage != "float":
                raise FastMNISTError(f"transform {t!r}: Normalize must follow ToTensor or ToDtype")
            if _float32(t.mean) != _float32(mean) or _float32(t.std) != _float32(std):
                raise FastMNISTError(f"transform {t!r}: normalises with mean {t.mean!r}, std "
                                     f"{t.std!r}, but the set was converted with mean {mean}, std "
                                     f"{std}; use Normalize(({mean},), ({std},)), or convert with those")
            stage = "normalised"
        elif name == "RandomErasing":
            if stage != "normalised":
                raise FastMNISTError(f"transform {t!r}: RandomErasing is replayed after Normalize only")
            erasing.append(_Erasing(t))
        elif stage != "uint8":
            raise FastMNISTError(f"transform {t!r}: {name} after ToTensor/ToDtype is not supported: put "
                                 "the geometric steps first, where they see the uint8 image")
        else:
            geometric.append({"RandomAffine": _Affine, "RandomRotation": _Rotation, "RandomCrop": _Crop,
                              "RandomPerspective": _Perspective, "ElasticTransform": _Elastic}[name](t, seen))
    if stage != "normalised":
        raise FastMNISTError(f"transform {transform!r}: must convert to float and Normalize(({mean},), "
                             f"({std},)) as the set does (ToTensor() + Normalize, or ToImage() + "
                             "ToDtype(torch.float32, scale=True) + Normalize)")
    return Augment(geometric, erasing, seed, reciprocal)


def _kind(t) -> str | None:
    """The name of the torchvision transform ``t`` is an instance of exactly (v1 or v2; not a
    subclass, whose ``forward`` may differ), if it is one of ``SUPPORTED``; else None."""
    import torchvision.transforms as v1
    from torchvision.transforms import v2

    name = type(t).__name__
    if name in SUPPORTED and type(t) in (getattr(v1, name, None), getattr(v2, name, None)):
        return name
    return None


def _float32(values) -> list[float]:
    """A number, or a sequence or tensor of them (``Normalize``'s mean or std), as the float32
    values torchvision computes with."""
    return torch.as_tensor(values, dtype=torch.float32).flatten().tolist()


def _to_scaled_float32(t) -> bool:
    dtype = t.dtype if not isinstance(t.dtype, dict) else next(iter(t.dtype.values()), None)
    return dtype == torch.float32 and bool(getattr(t, "scale", False))


def _interpolation(t) -> str:
    mode = getattr(t.interpolation, "value", t.interpolation)
    if mode not in ("nearest", "bilinear"):
        raise FastMNISTError(f"transform {t!r}: interpolation {mode!r} is not supported (nearest, bilinear)")
    return mode


def _fill(t, seen: type) -> float:
    """The fill of ``t`` for an input of type ``seen``, as torchvision picks it (v2: a dict by
    input type, its "others" entry for the rest)."""
    fill = t.fill
    if isinstance(fill, dict):
        fill = fill[seen] if seen in fill else fill.get("others")
    if isinstance(fill, (list, tuple)) and len(fill) == 1:
        fill = fill[0]
    if fill is None:
        return 0.0
    if not isinstance(fill, (int, float)) or not 0 <= fill <= 255:
        raise FastMNISTError(f"transform {t!r}: fill must be one number in 0..255, got {t.fill!r}")
    return float(fill)


class _Geometric:
    """A step that resamples the image through a grid, as torchvision's
    ``_apply_grid_transform`` does, all samples at once."""

    def __init__(self, t, seen: type):
        self.t, self.name, self.mode, self.fill = repr(t), type(t).__name__, _interpolation(t), _fill(t, seen)

    def __repr__(self):
        return self.t

    def resample(self, x: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 1, H, W)`` resampled at the float32 grid ``gx``, ``gy`` ``(B, H, W)``
        (in [-1, 1], align_corners=False), outside filled with ``fill``. ``gx``/``gy`` are
        used up."""
        b, _, h, w = x.shape
        if self.mode == "nearest":
            # grid_sample's nearest: unnormalise, round half to even; then one gather from
            # the image framed by a border of fill, where every outside coordinate lands
            # (a perspective's 0/0 points are NaN: outside, as grid_sample takes them)
            ix = gx.add_(1).mul_(w / 2).sub_(0.5).round_().nan_to_num_(-1.0)
            iy = gy.add_(1).mul_(h / 2).sub_(0.5).round_().nan_to_num_(-1.0)
            return _gather(x, iy, ix, self.fill)
        planes = torch.cat([x.to(torch.float32), torch.ones_like(x, dtype=torch.float32)], 1)
        out = torch.nn.functional.grid_sample(planes, torch.stack([gx, gy], -1), mode="bilinear",
                                              padding_mode="zeros", align_corners=False)
        image, mask = out[:, :1], out[:, 1:]
        fill = torch.tensor(self.fill, dtype=torch.float32, device=x.device)
        return image.sub_(fill).mul_(mask).add_(fill).round_().to(x.dtype)

    def fusable(self) -> bool:
        """Whether ``fused`` runs here (``kernels.mode`` knows this interpolation's rounding)."""
        return kernels.mode(self.mode) is not None

    @property
    def kernel_fill(self) -> float:
        """The fill as the kernels take it: rounded to a whole number for nearest, as
        ``resample`` frames the image."""
        return round(self.fill) if self.mode == "nearest" else self.fill

    def affine_kernel(self, config: list, x: np.ndarray, rows: np.ndarray, indices: np.ndarray,
                      key: np.uint64, norm: np.ndarray, reciprocal: bool, out: np.ndarray) -> None:
        """``kernels.affine`` with this step's ``config``: the uint8 images ``rows`` of ``x``
        ``(N, 28, 28)`` drawn, resampled and normalised into float32 ``out``, as ``apply`` then
        the normalisation."""
        kernels.affine(x, rows, indices, key, np.array(config, np.float64), _base("cpu").numpy(),
                       self.kernel_fill, kernels.mode(self.mode), norm, reciprocal, out)


def _gather(x: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor, fill: float) -> torch.Tensor:
    """uint8 ``(B, 1, H, W)`` images -> each output pixel the source pixel at row ``iy`` and
    column ``ix`` (whole numbers, float or int, broadcast to ``(B, H, W)``; used up), ``fill``
    where that is outside: one gather from the images framed by a border of ``fill``, where
    every outside coordinate lands."""
    b, _, h, w = x.shape
    source = iy.clamp_(-1, h).mul_(w + 2).add(ix.clamp_(-1, w)).add_(w + 3).to(torch.int64)
    framed = torch.nn.functional.pad(x.view(b, h, w), (1, 1, 1, 1), value=round(fill))
    return framed.view(b, -1).gather(1, source.expand(b, h, w).reshape(b, -1)).view(b, 1, h, w)


def _base(device) -> torch.Tensor:
    """float32 ``(28,)``: torchvision's base grid coordinates, ``-13.5 .. 13.5``."""
    return torch.linspace((1.0 - SIDE) * 0.5, (SIDE - 1.0) * 0.5, steps=SIDE, device=device)


def _plane(xs: torch.Tensor, ys: torch.Tensor, theta: torch.Tensor, column: int, third) -> torch.Tensor:
    """float32 ``(B, 28, 28)``: ``xs * theta[:, 0, c] + ys * theta[:, 1, c] + third`` for
    ``c = column``, with the roundings of ``torch.bmm`` of torchvision's base grid (left to
    right, one product at a time: equal to it bit for bit, tested)."""
    along_x = xs[None, None, :] * theta[:, 0, column, None, None]
    along_y = ys[None, :, None] * theta[:, 1, column, None, None]
    return (along_x + along_y).add_(third)


def _affine_grid(matrices: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(B, 28, 28)`` x and y of torchvision's ``_affine_grid`` of each inverse
    affine ``matrices`` row (6 float64 values, made float32 as torchvision makes them)."""
    theta = torch.from_numpy(matrices).to(torch.float32).view(-1, 2, 3).to(device)
    scaled = theta.transpose(1, 2).div_(torch.tensor([0.5 * SIDE] * 2, dtype=torch.float32, device=device))
    xs = _base(device)
    return tuple(_plane(xs, xs, scaled, c, scaled[:, 2, c, None, None]) for c in (0, 1))


def _inverse_affine(center, angle, translate, scale, shear) -> np.ndarray:
    """float64 ``(B, 6)``: torchvision's ``_get_inverse_affine_matrix`` for each sample
    (angles and shears in degrees, ``translate`` ``(B, 2)``, ``center`` relative to the
    image centre)."""
    return np.stack(inverse_affine(*center, angle, translate[:, 0].astype(np.float64),
                                   translate[:, 1].astype(np.float64), scale, shear[:, 0], shear[:, 1]), 1)


def inverse_affine(cx, cy, angle, tx, ty, scale, shear_x, shear_y) -> tuple:
    """The six float64 values of ``_inverse_affine`` (row by row), in torchvision's order of
    operations: for numpy arrays here and for one sample compiled in ``numba_kernels``."""
    rot, sx, sy = np.radians(angle), np.radians(shear_x), np.radians(shear_y)
    cos_sy, tan_sx, rot_minus_sy = np.cos(sy), np.tan(sx), rot - sy
    cx_plus_tx, cy_plus_ty = cx + tx, cy + ty
    a = np.cos(rot_minus_sy) / cos_sy
    b = -(a * tan_sx + np.sin(rot))
    c = np.sin(rot_minus_sy) / cos_sy
    d = np.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    return (m0, m1, 0.0 + (cx - m0 * cx_plus_tx - m1 * cy_plus_ty),
            m3, m4, 0.0 + (cy - m3 * cx_plus_tx - m4 * cy_plus_ty))


def _center(t) -> tuple[float, float]:
    """A transform's ``center`` relative to the image centre, as torchvision uses it."""
    if t.center is None:
        return 0.0, 0.0
    return float(t.center[0]) - SIDE * 0.5, float(t.center[1]) - SIDE * 0.5


class _Affine(_Geometric):
    """``RandomAffine``: angle, integer translation, scale and shear per sample."""

    def __init__(self, t, seen: type):
        super().__init__(t, seen)
        self.degrees = [float(v) for v in t.degrees]
        self.translate = None if t.translate is None else [float(v) for v in t.translate]
        self.scale = None if t.scale is None else [float(v) for v in t.scale]
        self.shear = None if t.shear is None else [float(v) for v in t.shear]
        self.center = _center(t)

    def params(self, draw) -> dict:
        u = draw(6)
        n = len(u)
        translate = np.zeros((n, 2), np.int64)
        if self.translate is not None:
            for k, fraction in enumerate(self.translate):
                limit = float(fraction * SIDE)
                translate[:, k] = np.round(_uniform(u[:, 1 + k], -limit, limit).astype(np.float64))
        shear = np.zeros((n, 2), np.float32)
        if self.shear is not None:
            shear[:, 0] = _uniform(u[:, 4], *self.shear[:2])
            if len(self.shear) == 4:
                shear[:, 1] = _uniform(u[:, 5], *self.shear[2:])
        scale = _uniform(u[:, 3], *self.scale) if self.scale is not None else np.ones(n, np.float32)
        return {"angle": torch.from_numpy(_uniform(u[:, 0], *self.degrees)),
                "translate": torch.from_numpy(translate), "scale": torch.from_numpy(scale),
                "shear": torch.from_numpy(shear)}

    def matrices(self, p: dict) -> np.ndarray:
        """float64 ``(B, 6)``: each sample's inverse affine matrix."""
        return _inverse_affine(self.center, p["angle"].double().numpy(), p["translate"].numpy(),
                               p["scale"].double().numpy(), p["shear"].double().numpy())

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return self.resample(x, *_affine_grid(self.matrices(p), x.device))

    def fused(self, x: np.ndarray, rows: np.ndarray, indices: np.ndarray, key: np.uint64, norm: np.ndarray,
              reciprocal: bool, out: np.ndarray) -> None:
        """``affine_kernel`` with this step's draws laid out for it."""
        shear = self.shear or []
        config = [kernels.AFFINE, *self.degrees, self.translate is not None,
                  *(float(f * SIDE) for f in self.translate or (0, 0)), self.scale is not None,
                  *(self.scale or (1, 1)), len(shear), *(shear + [0.0] * (4 - len(shear))), *self.center, 0]
        self.affine_kernel(config, x, rows, indices, key, norm, reciprocal, out)


class _Rotation(_Geometric):
    """``RandomRotation`` (``expand=False``): an angle per sample; multiples of 90 degrees
    about the centre are exact quarter turns, as torchvision's fast path makes them."""

    def __init__(self, t, seen: type):
        super().__init__(t, seen)
        if t.expand:
            raise FastMNISTError(f"transform {t!r}: expand=True changes the image size; not supported")
        self.degrees, self.center, self.centred = [float(v) for v in t.degrees], _center(t), t.center is None

    def params(self, draw) -> dict:
        return {"angle": torch.from_numpy(_uniform(draw(1)[:, 0], *self.degrees))}

    def matrices(self, p: dict) -> np.ndarray:
        angle = p["angle"].double().numpy() % 360
        n = len(angle)
        return _inverse_affine(self.center, -angle, np.zeros((n, 2)), np.ones(n), np.zeros((n, 2)))

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return self._quarter_turns(x, p, self.resample(x, *_affine_grid(self.matrices(p), x.device)))

    def fused(self, x: np.ndarray, rows: np.ndarray, indices: np.ndarray, key: np.uint64, norm: np.ndarray,
              reciprocal: bool, out: np.ndarray) -> None:
        """``affine_kernel`` with this step's draws laid out for it, quarter turns included."""
        config = [kernels.ROTATION, *self.degrees, *[0.0] * 11, *self.center, self.centred]
        self.affine_kernel(config, x, rows, indices, key, norm, reciprocal, out)

    def _quarter_turns(self, x: torch.Tensor, p: dict, out: torch.Tensor) -> torch.Tensor:
        """``out`` with the samples turned by a multiple of 90 degrees about the centre made
        exact quarter turns of ``x``."""
        if self.centred:
            angle = p["angle"].double().numpy() % 360
            for quarter in (0, 1, 2, 3):
                rows = torch.from_numpy(np.flatnonzero(angle == 90.0 * quarter)).to(x.device)
                if len(rows):
                    out[rows] = torch.rot90(x[rows], k=quarter, dims=(-2, -1))
        return out


class _Crop:
    """``RandomCrop(28, padding)``: pad (constant ``fill``), then crop at a random offset."""

    def __init__(self, t, seen: type):
        self.t, self.name = repr(t), type(t).__name__
        if list(t.size) != [SIDE, SIDE] or getattr(t, "padding_mode", "constant") != "constant":
            raise FastMNISTError(f"transform {t!r}: only RandomCrop(28, padding=..., "
                                 "padding_mode='constant') is supported")
        padding = t.padding or 0
        if isinstance(padding, int):
            padding = [padding] * 4
        elif len(padding) == 2:
            padding = [padding[0], padding[1], padding[0], padding[1]]
        v1 = type(t).__module__.startswith("torchvision.transforms.transforms")
        # v1 pads (left, top, right, bottom); v2 stores (left, right, top, bottom)
        left, top, right, bottom = padding if v1 else (padding[0], padding[2], padding[1], padding[3])
        self.left, self.top, self.height, self.width = left, top, SIDE + top + bottom, SIDE + left + right
        self.fill = _fill(t, seen)

    def __repr__(self):
        return self.t

    def fusable(self) -> bool:
        """Always: the crop resamples nothing, so no rounding decides it."""
        return True

    def params(self, draw) -> dict:
        u = draw(2)
        return {"top": torch.from_numpy(_randint(u[:, 0], 0, self.height - SIDE + 1)),
                "left": torch.from_numpy(_randint(u[:, 1], 0, self.width - SIDE + 1))}

    def fused(self, x: np.ndarray, rows: np.ndarray, indices: np.ndarray, key: np.uint64, norm: np.ndarray,
              reciprocal: bool, out: np.ndarray) -> None:
        """``kernels.shifted``: the uint8 images ``rows`` of ``x`` ``(N, 28, 28)`` drawn, cropped
        and normalised into float32 ``out``, as ``apply`` then the normalisation."""
        config = [self.height - SIDE + 1, self.width - SIDE + 1, self.top, self.left]
        kernels.shifted(x, rows, indices, key, np.array(config, np.float64), round(self.fill), norm,
                        reciprocal, out)

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        rows = torch.arange(SIDE, device=x.device)
        y = (p["top"].to(x.device)[:, None] + rows - self.top)[:, :, None]  # (B, 28, 1) source rows
        xs = (p["left"].to(x.device)[:, None] + rows - self.left)[:, None, :]  # (B, 1, 28) source columns
        return _gather(x, y, xs, self.fill)


class _Perspective(_Geometric):
    """``RandomPerspective``: applied with probability ``p``; corners moved by random integer
    offsets; the coefficients solved as torchvision solves them (float64 least squares)."""

    def __init__(self, t, seen: type):
        super().__init__(t, seen)
        self.distortion, self.p = float(t.distortion_scale), float(t.p)

    def params(self, draw) -> dict:
        u = draw(9)
        half = SIDE // 2
        bound = int(self.distortion * half) + 1
        low, high = _randint(u[:, 1:], 0, bound), _randint(u[:, 1:], SIDE - bound, SIDE)
        # topleft, topright, botright, botleft as (x, y), from torchvision's ranges
        ends = np.stack([low[:, 0], low[:, 1], high[:, 2], low[:, 3], high[:, 4], high[:, 5], low[:, 6],
                         high[:, 7]], 1).reshape(-1, 4, 2)
        return {"applied": torch.from_numpy(u[:, 0] < self.p), "endpoints": torch.from_numpy(ends)}

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        rows = torch.from_numpy(np.flatnonzero(p["applied"].numpy()))
        if not len(rows):
            return x
        coeffs = _perspective_coefficients(p["endpoints"][rows])
        out = x.clone()
        out[rows.to(x.device)] = self.resample(x[rows.to(x.device)], *_perspective_grid(coeffs, x.device))
        return out

    def fused(self, x: np.ndarray, rows: np.ndarray, indices: np.ndarray, key: np.uint64, norm: np.ndarray,
              reciprocal: bool, out: np.ndarray) -> None:
        """``kernels.perspective``: the uint8 images ``rows`` of ``x`` ``(N, 28, 28)`` drawn,
        resampled and normalised into float32 ``out``, as ``apply`` then the normalisation;
        the coefficients exact where that is certainly gels' solution (``kernels.
        perspective_coefficients``), else solved by torch as ``apply`` solves them."""
        p = self.params(lambda draws: keyed_uniforms(key, indices, draws))
        applied = p["applied"].numpy()
        coefficients = np.zeros((len(indices), 8), np.float32)
        if applied.any():
            ends = p["endpoints"].numpy()[applied]
            systems = _perspective_system(ends)
            solved, certain = kernels.perspective_coefficients(ends, systems)
            if not certain.all():
                solved[~certain] = _gels(systems[~certain]).numpy()
            coefficients[applied] = solved
        kernels.perspective(x, rows, coefficients, applied, _perspective_base("cpu").numpy(),
                            self.kernel_fill, kernels.mode(self.mode), norm, reciprocal, out)


START = [[0, 0], [SIDE - 1, 0], [SIDE - 1, SIDE - 1], [0, SIDE - 1]]


def _perspective_coefficients(ends: torch.Tensor) -> torch.Tensor:
    """float32 ``(B, 8)``: torchvision's ``_get_perspective_coeffs(START, ends[b])`` for each
    sample's int64 end points ``(B, 4, 2)``."""
    return _gels(_perspective_system(ends.cpu().numpy()))


def _perspective_system(ends: np.ndarray) -> np.ndarray:
    """float64 ``(B, 8, 8)``: the matrix of ``_get_perspective_coeffs``' least squares for
    each sample's end points ``(B, 4, 2)`` (its right-hand side is ``START``, flattened)."""
    e, s = ends.astype(np.float64), np.array(START, np.float64)
    x, y = e[:, :, 0], e[:, :, 1]  # (B, 4) each: row 2i of the system for end i's x, 2i + 1 its y
    a = np.zeros((len(e), 8, 8))
    a[:, 0::2, 0], a[:, 0::2, 1], a[:, 0::2, 2] = x, y, 1
    a[:, 1::2, 3], a[:, 1::2, 4], a[:, 1::2, 5] = x, y, 1
    a[:, 0::2, 6], a[:, 0::2, 7] = -s[:, 0] * x, -s[:, 0] * y
    a[:, 1::2, 6], a[:, 1::2, 7] = -s[:, 1] * x, -s[:, 1] * y
    return a


def _gels(systems: np.ndarray) -> torch.Tensor:
    """float32 ``(B, 8)``: the ``systems`` ``(B, 8, 8)`` (``_perspective_system``) solved as
    torchvision solves them (torch's least squares, gels), made float32."""
    b = torch.from_numpy(np.array(START, np.float64).reshape(8, 1)).expand(len(systems), 8, 1)
    solution = torch.linalg.lstsq(torch.from_numpy(systems), b, driver="gels").solution
    return solution.squeeze(-1).to(torch.float32)


def _perspective_base(device) -> torch.Tensor:
    """float32 ``(28,)``: torchvision's perspective base grid coordinates, ``0.5 .. 27.5``."""
    return torch.linspace(0.5, SIDE + 0.5 - 1.0, steps=SIDE, device=device)


def _perspective_grid(coeffs: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(B, 28, 28)`` x and y of torchvision's ``_perspective_grid`` of each row of
    ``coeffs``: ``(a x + b y + c) / (g x + h y + 1) - 1`` (scaled), with its roundings."""
    c = coeffs.to(device)
    theta1 = torch.stack([c[:, 0:3], c[:, 3:6]], 1).transpose(1, 2)
    theta1 = theta1.div_(torch.tensor([0.5 * SIDE] * 2, dtype=torch.float32, device=device))
    theta2 = torch.stack([c[:, 6:8], c[:, 6:8]], 2)  # (B, 2, 2): g, h for both columns
    steps = _perspective_base(device)
    below = _plane(steps, steps, theta2, 0, 1.0)
    return tuple(_plane(steps, steps, theta1, k, theta1[:, 2, k, None, None]).div_(below).sub_(1.0)
                 for k in (0, 1))


class _Elastic(_Geometric):
    """``ElasticTransform``: a displacement field per sample, uniform noise in [-1, 1]
    blurred by a Gaussian of ``sigma`` (reflect padding) and scaled by ``alpha / 28``."""

    def __init__(self, t, seen: type):
        super().__init__(t, seen)
        self.alpha, self.sigma = [float(v) for v in t.alpha], [float(v) for v in t.sigma]

    def params(self, draw) -> dict:
        u = draw(2 * SIDE * SIDE).astype(np.float32).reshape(-1, 2, SIDE, SIDE)
        noise = torch.from_numpy(u) * 2 - 1
        fields = []
        for axis in (0, 1):
            field = noise[:, axis:axis + 1]
            if self.sigma[axis] > 0:  # torchvision's kernel: this axis's size, both sigmas
                field = _blur(field, self.sigma, self._size(axis))
            fields.append(field * self.alpha[axis] / SIDE)
        return {"displacement": torch.cat(fields, 1).permute(0, 2, 3, 1).contiguous()}

    def _size(self, axis: int) -> int:
        """The taps of the blur of ``axis``'s field (odd), 0 where it is not blurred."""
        return int(8 * self.sigma[axis] + 1) | 1 if self.sigma[axis] > 0 else 0

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        side = _elastic_side(x.device)
        shift = p["displacement"].to(x.device)
        return self.resample(x, shift[..., 0] + side[None, None, :], shift[..., 1] + side[None, :, None])

    @functools.cached_property
    def _taps(self) -> tuple[np.ndarray, np.ndarray]:
        """``kernels.elastic``'s blur: float32 weights ``(2, 2, K)`` (x field then y field; x
        pass then y pass, as ``_blur`` makes them) and int64 sizes ``(2,)``; made once."""
        sizes = np.array([self._size(0), self._size(1)], np.int64)
        weights = np.zeros((2, 2, max(1, *sizes)), np.float32)
        for axis in np.flatnonzero(sizes):
            for dim in (0, 1):
                weights[axis, dim, :sizes[axis]] = _gaussian(sizes[axis], self.sigma[dim]).numpy()
        return weights, sizes

    def fusable(self) -> bool:
        """``_Geometric.fusable``, and each blur within the reflect padding torch allows (less
        than the image's side each way; torch refuses more, and the torch path says so)."""
        return super().fusable() and max(self._size(0), self._size(1)) // 2 < SIDE

    def fused(self, x: np.ndarray, rows: np.ndarray, indices: np.ndarray, key: np.uint64, norm: np.ndarray,
              reciprocal: bool, out: np.ndarray) -> None:
        """``kernels.elastic``: the uint8 images ``rows`` of ``x`` ``(N, 28, 28)`` with their
        displacement fields drawn, resampled and normalised into float32 ``out``, as ``apply``
        then the normalisation."""
        weights, sizes = self._taps
        kernels.elastic(x, rows, indices, key, weights, sizes, np.array(self.alpha, np.float32),
                        _elastic_side("cpu").numpy(), self.kernel_fill, kernels.mode(self.mode), norm,
                        reciprocal, out)


def _elastic_side(device) -> torch.Tensor:
    """float32 ``(28,)``: torchvision's identity grid of an elastic transform, per axis."""
    return torch.linspace((1 - SIDE) / SIDE, (SIDE - 1) / SIDE, SIDE, device=device)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    """float32 ``(size,)``: torchvision's 1-D Gaussian kernel of ``size`` taps and ``sigma``."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size)
    kernel = torch.exp(-0.5 * (x / sigma).pow(2))
    return kernel / kernel.sum()


def _blur(field: torch.Tensor, sigma: list[float], size: int) -> torch.Tensor:
    """float32 ``(B, 1, H, W)`` blurred as torchvision's ``gaussian_blur`` with an odd kernel
    ``size`` along both axes, ``sigma[0]`` along x and ``sigma[1]`` along y, reflect padding;
    separable, a fixed order of sums, so each sample's result is the same in any batch."""
    out = field
    for dim, s in ((3, sigma[0]), (2, sigma[1])):
        kernel = _gaussian(size, s)
        pad = [size // 2] * 2 + [0, 0] if dim == 3 else [0, 0] + [size // 2] * 2
        padded = torch.nn.functional.pad(out, pad, mode="reflect")
        acc = torch.zeros_like(out)
        for k in range(size):
            acc += kernel[k] * padded.narrow(dim, k, out.shape[dim])
        out = acc
    return out


class _Erasing:
    """``RandomErasing`` after ``Normalize``: with probability ``p`` a rectangle of random
    area and aspect ratio (up to 10 tries, as torchvision) set to ``value``."""

    def __init__(self, t):
        self.t, self.name = repr(t), type(t).__name__
        value = t.value
        if isinstance(value, (list, tuple)):
            value = value[0] if len(value) == 1 else None
        if value is None or isinstance(value, str):
            raise FastMNISTError(f"transform {t!r}: value='random' is not supported; give a number")
        self.p, self.scale, self.value = float(t.p), [float(v) for v in t.scale], float(value)
        self.log_ratio = [float(v) for v in torch.log(torch.tensor([float(r) for r in t.ratio]))]

    def __repr__(self):
        return self.t

    def params(self, draw) -> dict:
        u = draw(41)
        area = SIDE * SIDE
        erase_area = area * _uniform(u[:, 1:11], *self.scale).astype(np.float64)
        aspect = np.exp(_uniform(u[:, 11:21], *self.log_ratio)).astype(np.float32).astype(np.float64)
        h = np.round(np.sqrt(erase_area * aspect)).astype(np.int64)
        w = np.round(np.sqrt(erase_area / aspect)).astype(np.int64)
        fits = (h < SIDE) & (w < SIDE)
        first = np.argmax(fits, 1)
        rows = np.arange(len(u))
        found = fits[rows, first] & (u[:, 0] < self.p)
        h, w = np.where(found, h[rows, first], 0), np.where(found, w[rows, first], 0)
        top = _randint(u[rows, 21 + first], 0, SIDE - h + 1)
        left = _randint(u[rows, 31 + first], 0, SIDE - w + 1)
        top, left = np.where(found, top, 0), np.where(found, left, 0)
        return {"i": torch.from_numpy(top), "j": torch.from_numpy(left), "h": torch.from_numpy(h),
                "w": torch.from_numpy(w)}

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        at = torch.arange(SIDE, device=x.device)
        i, j, h, w = (p[k].to(x.device)[:, None] for k in ("i", "j", "h", "w"))
        rows = (at >= i) & (at < i + h)  # (B, 28)
        cols = (at >= j) & (at < j + w)
        box = (rows[:, :, None] & cols[:, None, :])[:, None]
        return x.masked_fill_(box, self.value)
