"""What fastmnist knows about the MNIST family: torchvision's layout, file names and md5s."""

from dataclasses import dataclass

from .errors import FastMNISTError

SPLITS = ("train", "test")
_FILE_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One MNIST-family dataset as torchvision lays it out under ``ROOT/<folder>/raw``."""

    name: str
    folder: str  # torchvision class name, also the folder under ROOT
    md5: dict  # file name (.gz) -> md5, copied from torchvision's ``resources``
    mean: float | None = None  # fixed normalisation; None: computed from the train split
    std: float | None = None
    num_classes: int = 10

    def stem(self, split: str, kind: str) -> str:
        """File name without ``.gz`` for ``split`` ('train'|'test') and ``kind`` ('images'|'labels')."""
        return _FILE_STEMS[(split, kind)]


DATASETS = {
    "mnist": DatasetSpec(
        "mnist",
        "MNIST",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mean=0.1307,
        std=0.3081,
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "FashionMNIST",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "kmnist": DatasetSpec(
        "kmnist",
        "KMNIST",
        {
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The spec for ``name`` ('mnist', 'fashion-mnist' or 'kmnist')."""
    try:
        return DATASETS[name]
    except KeyError:
        raise FastMNISTError(
            f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}"
        ) from None
