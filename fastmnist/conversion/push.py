"""``fastmnist push``: publish a converted set to any fsspec URL (``s3://bucket/set/``, ...).

Data files go first and ``manifest.json`` last: the manifest is the commit point, so a
reader never finds a manifest whose files are not all there as it describes them. A
different manifest already at the URL is deleted before any data file there changes.
Every uploaded file is read back (size and sha256) before the manifest is written; a
re-run uploads only the files missing or different there.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import FastMNISTError
from ..formats.files import hashed
from ..formats.manifest import MANIFEST, ArrayFile, Shard
from ..remote.transport import CHUNK, filesystem, store_error
from ..store import open_shards


@dataclass(frozen=True)
class PushResult:
    """What a push did: files ``uploaded`` (``bytes_uploaded`` in all), files ``kept``
    (already there, identical), and the set's ``url``."""

    url: str
    uploaded: list[str]
    kept: list[str]
    bytes_uploaded: int


def push(root, url: str, storage_options: dict | None = None, progress: bool = True) -> PushResult:
    """Upload the set at ``root`` (checked against its manifest first) to ``url``, a
    directory-like fsspec URL; ``storage_options`` as ``fsspec.filesystem`` takes them.
    Raises :class:`FastMNISTError` naming the file and what is wrong."""
    root = Path(root)
    local = open_shards(root, verify=True)  # never publish a damaged set
    manifest = (root / MANIFEST).read_bytes()
    url = url if url.endswith("/") else url + "/"
    fs, prefix = filesystem(url, storage_options)
    prefix = prefix.rstrip("/")
    if "file" in fs.protocol:  # a local directory must exist; object stores have no directories
        fs.makedirs(prefix, exist_ok=True)
    files = list(local.manifest.files())
    remote = {m.file: f"{prefix}/{m.file}" for m in files} | {MANIFEST: f"{prefix}/{MANIFEST}"}
    try:
        there = fs.exists(remote[MANIFEST])
        same = there and fs.size(remote[MANIFEST]) == len(manifest) \
            and fs.cat_file(remote[MANIFEST]) == manifest
        todo = [m for m in files if not _matches(fs, remote[m.file], m, url)]
        if same and not todo:
            return PushResult(url, [], [m.file for m in files], 0)
        if there:
            fs.rm_file(remote[MANIFEST])  # the old set stops being a set before anything changes
        _upload(fs, root, remote, url, todo, progress)
        for m in todo:
            if not _matches(fs, remote[m.file], m, url):
                raise FastMNISTError(f"{url}{m.file}: read back after the upload, its size or sha256 "
                                     "differs from the manifest")
        fs.pipe_file(remote[MANIFEST], manifest)
        if fs.cat_file(remote[MANIFEST]) != manifest:
            raise FastMNISTError(f"{url}{MANIFEST}: read back after the upload, it differs from "
                                 f"{root / MANIFEST}")
    except FastMNISTError:
        raise
    except Exception as e:  # the store's own errors about the manifest: denied, no credentials, ...
        raise store_error(url + MANIFEST, e) from None
    return PushResult(url, [m.file for m in todo], [m.file for m in files if m not in todo],
                      sum(m.size for m in todo))


def _matches(fs, path: str, meta: ArrayFile | Shard, url: str) -> bool:
    """Whether ``path`` exists with ``meta``'s size and sha256 (read back in chunks)."""
    try:
        if fs.size(path) != meta.size:
            return False
        with fs.open(path, "rb", block_size=CHUNK) as f:
            sha = hashed(f, hashlib.sha256(), block=CHUNK)[0]
    except FileNotFoundError:
        return False
    except Exception as e:
        raise store_error(url + meta.file, e) from None
    return sha.hexdigest() == meta.sha256


def _upload(fs, root: Path, remote: dict, url: str, todo: list, progress: bool) -> None:
    """Put each file of ``todo`` from ``root`` at its ``remote`` path, with one progress bar."""
    from fsspec.callbacks import Callback
    from tqdm import tqdm

    with tqdm(total=sum(m.size for m in todo), unit="B", unit_scale=True, desc=f"push {url}",
              disable=not progress) as bar:

        class Progress(Callback):
            def relative_update(self, inc=1):
                bar.update(inc)

        for m in todo:
            try:
                fs.put_file(str(root / m.file), remote[m.file], callback=Progress())
            except FileNotFoundError:
                raise FastMNISTError(f"{url}{m.file}: cannot upload: no such bucket or directory") from None
            except Exception as e:
                raise store_error(url + m.file, e) from None
