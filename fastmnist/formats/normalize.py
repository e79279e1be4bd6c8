"""The exact arithmetic of ``ToTensor()`` then ``Normalize((mean,), (std,))``, and of
torchvision v2's ``ToDtype(torch.float32, scale=True)`` then ``Normalize`` (``reciprocal``:
it multiplies by ``1 / 255`` instead of dividing by 255, which gives other bits for 126 of
the 256 pixel values).

Each float32 output depends only on its uint8 input, so a 256-entry table computed on the
CPU reproduces the torchvision result bit for bit on any device. (CUDA divides by a
scalar through its reciprocal, so running the arithmetic there can differ in the last bit.)
numpy's float32 division and subtraction round as torch's do, so the same operations in
numpy give the same bits without importing torch (a test checks all 256 values).
"""

import numpy as np


def normalize_u8_numpy(images: np.ndarray, mean: float, std: float, out: np.ndarray,
                       reciprocal: bool = False) -> np.ndarray:
    """uint8 ``images`` -> float32 ``(x / 255 - mean) / std`` into ``out`` (same shape), with
    torchvision's float32 operations in torchvision's order; single-threaded (torch's
    intra-op threads stall while other threads of the process hold the cores)."""
    if reciprocal:
        np.multiply(images, np.float32(1 / 255), out=out, dtype=np.float32)
    else:
        np.divide(images, np.float32(255), out=out, dtype=np.float32)
    np.subtract(out, np.float32(mean), out=out)
    return np.divide(out, np.float32(std), out=out)


def lookup_table(mean: float, std: float, reciprocal: bool = False) -> np.ndarray:
    """float32 ``(256,)``: entry ``v`` is the normalised value of pixel byte ``v``."""
    pixels = np.arange(256, dtype=np.uint8)
    return normalize_u8_numpy(pixels, mean, std, np.empty(256, np.float32), reciprocal)


def normalize_u8(images, mean, std, out=None, reciprocal: bool = False):
    """uint8 torch tensor of any shape -> float32 (into ``out``, same shape, when given), as
    ``normalize_u8_numpy`` computes it, with torch's operations (multi-threaded on the CPU).
    ``mean``/``std``: floats or float32 scalar tensors (made once by a caller that
    normalises many batches)."""
    import torch

    x = images.to(torch.float32) if out is None else out.copy_(images)
    x = x.mul_(1.0 / 255) if reciprocal else x.div_(255)
    return x.sub_(torch.as_tensor(mean, dtype=torch.float32)).div_(torch.as_tensor(std, dtype=torch.float32))


class Normalizer:
    """Called with uint8 torch images on ``device``: float32 normalised, equal to the CPU
    result: the arithmetic on the CPU (into ``out=`` when given), a table lookup elsewhere.
    Plain data only, so a loader holding one pickles (DataLoader workers under spawn)."""

    def __init__(self, mean: float, std: float, device, reciprocal: bool = False):
        self.mean, self.std, self.device, self.reciprocal = mean, std, device, reciprocal
        self._made = None  # float32 (mean, std) tensors, or the table on the device: made on first use

    def __call__(self, x, out=None):
        import torch

        if self._made is None:
            if self.device.type == "cpu":
                self._made = tuple(torch.tensor(v, dtype=torch.float32) for v in (self.mean, self.std))
            else:
                table = lookup_table(self.mean, self.std, self.reciprocal)
                self._made = torch.from_numpy(table).to(self.device)
        if self.device.type == "cpu":
            return normalize_u8(x, *self._made, out, self.reciprocal)
        return self._made[x.long()]

    def __getstate__(self):
        return {**self.__dict__, "_made": None}
