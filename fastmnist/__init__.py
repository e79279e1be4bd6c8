"""fastmnist: fast, exact MNIST-family loading for PyTorch from pre-normalised shards."""

__version__ = "0.1.0"

from .convert import ConvertResult, convert  # noqa: E402
from .errors import FastMNISTError  # noqa: E402
from .loader import FastMNISTLoader  # noqa: E402
from .store import ShardSet, Split, open_shards, verify_shards  # noqa: E402

__all__ = [
    "ConvertResult",
    "FastMNISTError",
    "FastMNISTLoader",
    "ShardSet",
    "Split",
    "convert",
    "open_shards",
    "verify_shards",
]
