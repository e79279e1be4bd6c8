"""The exact arithmetic of ``ToTensor()`` then ``Normalize((mean,), (std,))``.

Each float32 output depends only on its uint8 input, so a 256-entry table reproduces the
torchvision result bit for bit on any device.
"""

import torch


def normalize_u8(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 images of any shape -> float32 ``(x / 255 - mean) / std``, in torchvision's order
    of float32 operations."""
    x = images.to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    return x.sub_(m).div_(s)


def lookup_table(mean: float, std: float, device=None) -> torch.Tensor:
    """float32 ``(256,)``: entry ``v`` is the normalised value of pixel byte ``v``."""
    return normalize_u8(torch.arange(256, dtype=torch.uint8), mean, std).to(device)
