"""The exact arithmetic of ``ToTensor()`` then ``Normalize((mean,), (std,))``.

Each float32 output depends only on its uint8 input, so a 256-entry table computed on
the CPU reproduces the torchvision result bit for bit on any device. (CUDA divides by a
scalar through its reciprocal, so running the arithmetic there can differ in the last bit.)
"""

from collections.abc import Callable

import numpy as np
import torch


def normalize_u8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images of any shape -> float32 ``(x / 255 - mean) / std``, computed with
    torchvision's float32 operations in torchvision's order. ``mean``/``std``: floats or
    float32 scalar tensors (made once by a caller that normalises many batches)."""
    x = images.to(torch.float32).div_(255)
    return x.sub_(torch.as_tensor(mean, dtype=torch.float32)).div_(
        torch.as_tensor(std, dtype=torch.float32))


def normalize_u8_numpy(images: np.ndarray, mean: float, std: float, out: np.ndarray) -> np.ndarray:
    """``normalize_u8`` in numpy, into float32 ``out`` shaped like uint8 ``images``: the same
    float32 operations, so the same bits, and single-threaded (torch's intra-op threads
    stall while other threads of the process hold the cores)."""
    np.divide(images, np.float32(255), out=out, dtype=np.float32)
    np.subtract(out, np.float32(mean), out=out)
    return np.divide(out, np.float32(std), out=out)


def lookup_table(mean: float, std: float) -> torch.Tensor:
    """float32 ``(256,)`` on the CPU: entry ``v`` is the normalised value of pixel byte ``v``."""
    return normalize_u8(torch.arange(256, dtype=torch.uint8), mean, std)


def normalizer(mean: float, std: float, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function uint8 images on ``device`` -> float32 normalised, equal to the CPU result."""
    if device.type == "cpu":
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        return lambda x: normalize_u8(x, m, s)
    table = lookup_table(mean, std).to(device)
    return lambda x: table[x.long()]
