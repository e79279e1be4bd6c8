"""Inputs of every kind ``convert_from`` reads, written from uint8 digits with the tools their
users have: pyarrow (Hugging Face parquet), numpy (``.npz``, CSV), Pillow (PNG files and
folders) and webdataset's ``TarWriter`` (foreign shards). For the tests and the conversion
benchmark."""

import io
import json
from pathlib import Path

import numpy as np


def png_bytes(images: np.ndarray) -> list[bytes]:
    """Each uint8 ``(28, 28)`` image of ``images`` as PNG bytes, written by Pillow."""
    from PIL import Image

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_parquet(path: Path, pngs: list[bytes], labels, names: list[str] | None = None) -> Path:
    """A parquet file as the Hugging Face Hub stores MNIST: an ``image`` struct of PNG
    ``bytes`` and ``path``, an int64 ``label``, and (``names``) the ``ClassLabel`` feature in
    the schema's metadata, as ``datasets`` writes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.array([{"bytes": b, "path": None} for b in pngs],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "label": pa.array(np.asarray(labels), pa.int64())})
    if names:
        meta = {"info": {"features": {"image": {"_type": "Image"},
                                      "label": {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
    pq.write_table(table, path)
    return path


def write_wds(folder: Path, split: str, pngs: list[bytes], labels, shard_size: int = 4000,
              spoil=None) -> Path:
    """``{split}-000000.tar``, ... of ``png``/``cls`` samples keyed ``sample000000``, ...,
    written by webdataset's ``TarWriter``; ``spoil(i, sample)`` may change a sample."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for s, first in enumerate(range(0, len(labels), shard_size)):
        with wds.TarWriter(str(folder / f"{split}-{s:06d}.tar")) as sink:
            for i in range(first, min(first + shard_size, len(labels))):
                sample = {"__key__": f"sample{i:06d}", "png": pngs[i], "cls": int(labels[i])}
                sink.write(spoil(i, sample) if spoil else sample)
    return folder


def write_csv(path: Path, images: np.ndarray, labels, header: bool = True) -> Path:
    """Kaggle's layout: ``label,pixel0..pixel783`` (the header line only if ``header``)."""
    table = np.column_stack([np.asarray(labels), images.reshape(len(images), -1)])
    names = "label," + ",".join(f"pixel{i}" for i in range(images[0].size)) if header else ""
    np.savetxt(path, table, fmt="%d", delimiter=",", header=names, comments="")
    return path


def write_folder(root: Path, split: str, pngs: list[bytes], labels) -> Path:
    """``root/<split>/<label>/<index:05d>.png``: torchvision's ImageFolder layout per split."""
    for i, (png, label) in enumerate(zip(pngs, labels, strict=True)):
        (root / split / str(label)).mkdir(parents=True, exist_ok=True)
        (root / split / str(label) / f"{i:05d}.png").write_bytes(png)
    return root


def write_input(kind: str, folder: Path, images: np.ndarray, labels, split: str = "train") -> Path:
    """One split of digits as an input of ``kind`` (not idx) under ``folder``: the path to convert."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "npz":
        path = folder / "mnist.npz"
        np.savez(path, **{f"x_{split}": images, f"y_{split}": labels})
        return path
    if kind == "csv":
        return write_csv(folder / f"{split}.csv", images, labels)
    pngs = png_bytes(images)
    if kind == "hf":
        return write_parquet(folder / f"{split}-00000-of-00001.parquet", pngs, labels,
                             [str(c) for c in range(10)])
    if kind == "images":
        return write_folder(folder, split, pngs, labels)
    if kind == "wds":
        return write_wds(folder, split, pngs, labels)
    raise ValueError(f"unknown kind {kind!r}")
