"""What fastmnist knows about the MNIST family: torchvision's layout, file names and md5s.

Each dataset is read from the files torchvision's class of the same name reads, under
``ROOT/<folder>/raw``, with the same quirks: EMNIST's images are stored transposed and
torchvision yields them so (so does fastmnist); EMNIST ``letters`` labels run 1..26 (class
0 is "N/A"); QMNIST's labels are 8 int32 columns, of which ``compat=True`` keeps the class
(``qmnist``) and ``compat=False`` all eight (``qmnist-extended``); its ``test10k`` and
``test50k`` are the first 10,000 and the remaining rows of its ``test`` files.
"""

import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FastMNISTError

# what `convert --from` reads: torchvision's IDX files (this module) and the kinds of
# formats/foreign.py; here, so that the command line knows them without importing numpy
INPUT_KINDS = ("idx", "hf", "npz", "csv", "images", "wds")
COMPRESSIONS = (".gz", ".xz", "")  # a raw file may be stored compressed; torchvision extracts them
# in a raw folder, says that its files were generated (``fastmnist synth``), not real data
SYNTHETIC_MARKER = "fastmnist-synthetic.json"


@dataclass(frozen=True)
class RawFiles:
    """A split's images and labels files (names without compression suffix), and the rows
    of them that make the split: ``start`` up to ``stop`` (None: the end)."""

    images: str
    labels: str
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One MNIST-family dataset as torchvision lays it out under ``ROOT/<folder>/raw``."""

    name: str
    folder: str  # torchvision class name, also the folder under ROOT
    splits: dict[str, RawFiles]
    md5: dict = field(default_factory=dict)  # file name (compressed) -> md5, from torchvision
    mean: float | None = None  # fixed normalisation; None: computed from the train split
    std: float | None = None
    num_classes: int = 10
    label_columns: int = 0  # 0: labels are a uint8 IDX1 file; 8: QMNIST's int32 (N, 8)
    extended: bool = False  # keep every label column (labels (N, label_columns)), not just the class
    default_splits: tuple[str, ...] = ("train", "test")
    download_args: tuple[dict, ...] = ({"train": True}, {"train": False})  # torchvision kwargs

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Shape of one converted label: ``()`` (the class), or ``(8,)`` for ``qmnist-extended``."""
        return (self.label_columns,) if self.extended else ()


def _mnist_like(name: str, folder: str, md5s: list[str], **kw) -> DatasetSpec:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    return DatasetSpec(name, folder, {"train": RawFiles(*stems[:2]), "test": RawFiles(*stems[2:])},
                       {f"{s}.gz": m for s, m in zip(stems, md5s, strict=True)}, **kw)


def _emnist(split: str, num_classes: int) -> DatasetSpec:
    files = {s: RawFiles(f"emnist-{split}-{s}-images-idx3-ubyte", f"emnist-{split}-{s}-labels-idx1-ubyte")
             for s in ("train", "test")}
    # torchvision checks only the md5 of the whole gzip.zip, not of the files inside it
    return DatasetSpec(f"emnist-{split}", "EMNIST", files, num_classes=num_classes,
                       download_args=({"split": split},))


def _qmnist(extended: bool) -> DatasetSpec:
    test = ("qmnist-test-images-idx3-ubyte", "qmnist-test-labels-idx2-int")
    files = {"train": RawFiles("qmnist-train-images-idx3-ubyte", "qmnist-train-labels-idx2-int"),
             "test": RawFiles(*test), "test10k": RawFiles(*test, 0, 10000),
             "test50k": RawFiles(*test, 10000),
             "nist": RawFiles("xnist-images-idx3-ubyte", "xnist-labels-idx2-int")}
    md5 = {"qmnist-train-images-idx3-ubyte.gz": "ed72d4157d28c017586c42bc6afe6370",
           "qmnist-train-labels-idx2-int.gz": "0058f8dd561b90ffdd0f734c6a30e5e4",
           "qmnist-test-images-idx3-ubyte.gz": "1394631089c404de565df7b7aeaf9412",
           "qmnist-test-labels-idx2-int.gz": "5b5b05890a5e13444e108efe57b788aa",
           "xnist-images-idx3-ubyte.xz": "7f124b3b8ab81486c9d8c2749c17f834",
           "xnist-labels-idx2-int.xz": "5ed0e788978e45d4a8bd4b7caec3d79d"}
    return DatasetSpec("qmnist-extended" if extended else "qmnist", "QMNIST", files, md5,
                       label_columns=8, extended=extended, default_splits=("train", "test", "nist"),
                       download_args=({"what": "train"}, {"what": "test"}))


_EMNIST_CLASSES = {  # torchvision's EMNIST.classes_split_dict, counted
    "byclass": len(string.digits + string.ascii_letters),
    "bymerge": 47,
    "balanced": 47,
    "letters": 1 + len(string.ascii_lowercase),  # "N/A", then a..z as 1..26
    "digits": 10,
    "mnist": 10,
}

DATASETS = {spec.name: spec for spec in [
    _mnist_like("mnist", "MNIST", ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                   "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
                mean=0.1307, std=0.3081),
    _mnist_like("fashion-mnist", "FashionMNIST",
                ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                 "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]),
    _mnist_like("kmnist", "KMNIST", ["bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
                                     "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"]),
    *(_emnist(split, n) for split, n in _EMNIST_CLASSES.items()),
    _qmnist(extended=False),
    _qmnist(extended=True),
]}


def get_spec(name: str) -> DatasetSpec:
    """The spec for ``name`` (a key of ``DATASETS``: 'mnist', 'emnist-letters', 'qmnist', ...)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise FastMNISTError(
            f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}"
        ) from None


def find_raw_root(path, prefer: str = "mnist") -> tuple[Path, str] | None:
    """``(root, dataset)`` when ``path`` is a torchvision root holding a family dataset's raw
    files (``root/<folder>/raw/...``; dataset ``prefer`` first), or that root's ``<folder>``
    or ``<folder>/raw`` directory; otherwise None. For the hint of what ``fastmnist
    convert`` command would work."""
    path = Path(path)
    specs = sorted(DATASETS.values(), key=lambda spec: spec.name != prefer)
    candidates = [(path, spec) for spec in specs]
    candidates += [(path.parent, spec) for spec in specs if path.name == spec.folder]
    candidates += [(path.parent.parent, spec) for spec in specs
                   if path.name == "raw" and path.parent.name == spec.folder]
    for root, spec in candidates:
        raw = root / spec.folder / "raw"
        names = {getattr(f, kind) for f in spec.splits.values() for kind in ("images", "labels")}
        if any((raw / (name + c)).is_file() for name in names for c in COMPRESSIONS):
            return root, spec.name
    return None


def convert_command(root: Path, dataset: str, out: str | None = None) -> str:
    """The ``fastmnist convert`` command line that converts ``dataset`` under ``root``."""
    flags = "" if dataset == "mnist" else f" --dataset {dataset}"
    return f"fastmnist convert --root {shlex.quote(str(root))} --out {out or 'shards/' + dataset}{flags}"
