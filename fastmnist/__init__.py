"""fastmnist: fast, exact MNIST-family loading for PyTorch from pre-normalised shards.

Importing fastmnist imports neither torch nor torchvision: ``FastMNISTLoader`` brings torch
in when it is first used, so converting and verifying stay quick and torch-free.
"""

import importlib

__version__ = "0.1.0"

_WHERE = {  # public name -> the module that defines it
    "ConvertResult": "conversion.converter",
    "convert": "conversion.converter",
    "convert_arrays": "conversion.inputs",
    "convert_from": "conversion.inputs",
    "FastMNISTError": "errors",
    "FastMNISTLoader": "loader",
    "holdout": "loading.select",
    "Manifest": "formats.manifest",
    "PushResult": "conversion.push",
    "push": "conversion.push",
    "Retry": "remote.transport",
    "ShardSet": "store",
    "Split": "store",
    "open_shards": "store",
    "Partition": "partition",
    "partition": "partition",
    "permuted_tasks": "tasks",
    "rotated_tasks": "tasks",
    "split_tasks": "tasks",
    "TaskStream": "tasks",
    "verify_shards": "store",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fastmnist' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once imported, found directly
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
