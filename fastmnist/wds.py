"""WebDataset tar shards in a fixed layout: written with ``webdataset.TarWriter``, read back
by validating each shard once and slicing it, with no per-sample parsing.

Each sample is two tar members, in TarWriter's sorted order: ``{key}.cls`` (the label as
text) and ``{key}.npy`` (the uint8 ``(28, 28)`` image saved by ``np.save``). Keys are the
sample's 8-digit index in its split and the modification times are 0, so every member has
the same size and every sample starts ``STRIDE`` bytes after the previous one.
"""

import bisect
import hashlib
import io
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .errors import FastMNISTError
from .normalize import normalize_u8_numpy


def _npy_prefix() -> np.ndarray:
    """The bytes ``np.save`` writes before a uint8 ``(28, 28)`` image: its .npy header."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((28, 28), np.uint8))
    return np.frombuffer(buf.getvalue()[:-28 * 28], np.uint8)


BLOCK = 512
_NPY_PREFIX = _npy_prefix()
_NPY_HEADER = len(_NPY_PREFIX)  # 128: np.save pads its header to a multiple of 64
NPY_SIZE = _NPY_HEADER + 28 * 28
STRIDE = 2 * BLOCK + (1 + -(-NPY_SIZE // BLOCK)) * BLOCK  # cls: header + 1 block; npy: header + 2
_CLS_DATA, _NPY_HDR, _IMAGE = BLOCK, 2 * BLOCK, 3 * BLOCK + _NPY_HEADER


def write_shards(directory: Path, split: str, images: np.ndarray, labels: np.ndarray,
                 shard_size: int, progress=None) -> list[dict]:
    """Write ``{split}-000000.tar``, ... of ``shard_size`` samples each from uint8 images
    ``(N,1,28,28)`` and labels ``(N,)``; returns one manifest entry per shard."""
    import webdataset

    from .store import sha256_file

    shards = []
    for number, start in enumerate(range(0, len(labels), shard_size)):
        path = directory / f"{split}-{number:06d}.tar"
        stop = min(start + shard_size, len(labels))
        with open(path, "wb") as f, webdataset.TarWriter(f, mtime=0) as writer:
            for i in range(start, stop):
                writer.write({"__key__": f"{i:08d}", "npy": images[i, 0], "cls": int(labels[i])})
            if progress is not None:
                progress.update(stop - start)
        shards.append({"file": path.name, "first": start, "count": stop - start,
                       "size": path.stat().st_size, "sha256": sha256_file(path)})
    return shards


def decode_shard(data, count: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a shard's bytes against the layout and return its uint8 images
    ``(count,1,28,28)`` and int64 labels ``(count,)``, both contiguous copies (so ``data``
    can be freed); errors name the shard."""
    a = np.frombuffer(data, np.uint8)
    need = count * STRIDE + 2 * BLOCK
    if len(a) < need:
        raise FastMNISTError(f"{name}: truncated: {len(a)} bytes, {count} samples need {need}")
    rows = a[: count * STRIDE].reshape(count, STRIDE)
    words = np.frombuffer(data, np.uint64, count * STRIDE // 8).reshape(count, STRIDE // 8)
    for offset, suffix in ((0, b".cls"), (_NPY_HDR, b".npy")):
        _check_headers(rows[:, offset:offset + BLOCK], words[:, offset // 8:(offset + BLOCK) // 8],
                       suffix, name)
    npy_words = words[:, 3 * BLOCK // 8:_IMAGE // 8]
    if not (npy_words == _NPY_PREFIX.view(np.uint64)).all():
        raise FastMNISTError(f"{name}: an image entry is not a uint8 28x28 .npy (corrupted)")
    digits = rows[:, _CLS_DATA]
    if ((digits < 48) | (digits > 57)).any() or rows[:, _CLS_DATA + 1].any():
        raise FastMNISTError(f"{name}: a .cls entry is not a single digit (corrupted)")
    if a[count * STRIDE: need].any():
        raise FastMNISTError(f"{name}: more samples than the manifest's {count}, or a bad end")
    images = np.ascontiguousarray(rows[:, _IMAGE:_IMAGE + 784]).reshape(count, 1, 28, 28)
    return images, (digits - 48).astype(np.int64)


# Header bytes 148..155 hold the checksum: compare words 18 and 19 of a header around them.
_WORD18, _WORD19 = np.uint64(0x00000000FFFFFFFF), np.uint64(0xFFFFFFFF00000000)


def _check_headers(headers: np.ndarray, words: np.ndarray, suffix: bytes, name: str) -> None:
    """Every member header must equal the first but for its key digits and checksum, and
    every checksum must be right: whole-word comparisons, no per-sample parsing.
    ``headers``: uint8 ``(n, 512)``; ``words``: the same bytes as uint64 ``(n, 64)``."""
    first = headers[0]
    if bytes(first[8:12]) != suffix or bytes(first[12:16]) != bytes(4):
        raise FastMNISTError(f"{name}: sample 0: not a fastmnist {suffix[1:].decode()} member "
                             "where the layout expects one (not converted by fastmnist?)")
    key = headers[:, :8]
    w0 = words[0]
    same = ((words[:, 1:18] == w0[1:18]).all(1) & (words[:, 20:] == w0[20:]).all(1)
            & ((words[:, 18] & _WORD18) == (w0[18] & _WORD18))
            & ((words[:, 19] & _WORD19) == (w0[19] & _WORD19))
            & ((key >= 48) & (key <= 57)).all(1))
    if not same.all():
        raise FastMNISTError(f"{name}: sample {int(np.argmin(same))}: unexpected tar member "
                             "header (corrupted, or not in fastmnist's layout)")
    fixed = int(first[8:148].sum(dtype=np.int64) + first[156:].sum(dtype=np.int64)) + 8 * 32
    stored = (headers[:, 148:154].astype(np.int64) - 48) @ (8 ** np.arange(5, -1, -1))
    wrong = stored != fixed + key.sum(1, dtype=np.int64)
    if wrong.any():
        raise FastMNISTError(f"{name}: sample {int(np.argmax(wrong))}: tar header checksum "
                             "mismatch (corrupted)")


def is_url(source) -> bool:
    return isinstance(source, (list, tuple)) or (
        isinstance(source, str) and source.startswith(("http://", "https://", "file://", "pipe:")))


def expand_urls(source) -> list[str]:
    """A URL, a brace pattern (``train-{000000..000005}.tar``) or a list -> a list of URLs."""
    from braceexpand import braceexpand

    sources = [source] if isinstance(source, str) else list(source)
    return [url for s in sources for url in braceexpand(s)]


def fetch(url: str, size: int | None = None):
    """The whole object at ``url`` (a path, ``file://``, ``http(s)://`` or ``pipe:COMMAND``)
    as bytes; from a path or URL of known ``size``, read straight into one uint8 array (a
    short read is an error)."""
    try:
        if url.startswith("pipe:"):
            done = subprocess.run(url[5:], shell=True, capture_output=True, check=False)
            if done.returncode != 0:
                raise FastMNISTError(f"{url}: command exited {done.returncode}: "
                                     f"{done.stderr.decode(errors='replace').strip()[-300:]}")
            return done.stdout
        remote = url.startswith(("http://", "https://", "file://"))
        with urllib.request.urlopen(url, timeout=60) if remote else open(url, "rb") as f:
            if size is None:
                return f.read()
            buf = np.empty(size, np.uint8)  # unlike bytearray, not zeroed while holding the GIL
            view, got = memoryview(buf), 0
            while got < size and (n := f.readinto(view[got:])):
                got += n
            if got < size:
                raise FastMNISTError(f"{url}: truncated: {got} bytes, the manifest says {size}")
            return buf
    except urllib.error.HTTPError as e:
        raise FastMNISTError(f"{url}: HTTP error {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FastMNISTError(f"{url}: cannot read: {getattr(e, 'reason', e)}") from None


class ShardCache:
    """Streamed shards, fetched whole (each in its own thread) and validated once, keeping
    only the shards in use plus the next ``prefetch`` of the visiting order.

    ``shards``: dicts with ``url``, ``first``, ``count``, ``size`` and ``sha256`` (checked
    when ``verify``). ``normalize``: ``(mean, std)`` to gather float32 normalised images, or
    None to gather uint8. Gathering runs in numpy, single-threaded: torch's intra-op threads
    stall whenever a fetching thread holds a core.
    """

    def __init__(self, shards: list[dict], prefetch: int, verify: bool,
                 normalize: tuple[float, float] | None):
        self.shards, self.prefetch, self.verify, self.normalize = shards, prefetch, verify, normalize
        self.firsts = np.array([s["first"] for s in shards])
        self.loaded = {}  # shard number -> (images, labels): uint8 (n,1,28,28), int64 (n,)
        self.pending = {}  # shard number -> Future of (images, labels)
        self.pool = None
        self.in_use = []  # the shards of the batch index_batches yielded last

    def index_batches(self, order: torch.Tensor, batches, batch_size: int, then: torch.Tensor):
        """Yield ``order[b * batch_size:(b + 1) * batch_size]`` as int64 numpy arrays for each
        ``b`` of ``batches`` (ascending), each once the shards it needs are loaded, with the
        next ``prefetch`` shards being fetched: those ``order`` visits next, then those
        ``then`` (the next epoch's order) starts with."""
        plan, starts = self._plan(order)  # order visits shard plan[i] from position starts[i]
        visits = plan + self._plan(then)[0]
        order, here = order.numpy(), None
        for b in batches:
            start, stop = b * batch_size, min((b + 1) * batch_size, len(order))
            p, q = bisect.bisect_right(starts, start) - 1, bisect.bisect_right(starts, stop - 1) - 1
            if (p, q) != here:
                here = p, q
                self._keep(plan[p:q + 1], visits[q + 1:q + 1 + self.prefetch])
            yield order[start:stop]

    def _plan(self, order: torch.Tensor) -> tuple[list[int], list[int]]:
        """The shards ``order`` visits, in turn, and the position where each visit starts."""
        which = np.searchsorted(self.firsts, order.numpy(), side="right") - 1
        starts = np.flatnonzero(np.diff(which, prepend=-1))
        return which[starts].tolist(), starts.tolist()

    def gather(self, idx: np.ndarray, x_out=None, y_out=None):
        """Images (float32 if ``normalize``, else uint8) and int64 labels of the samples
        ``idx``: the batch ``index_batches`` yielded last."""
        shape, dtype = (len(idx), 1, 28, 28), np.uint8 if self.normalize is None else np.float32
        x = x_out.numpy() if x_out is not None else np.empty(shape, dtype)
        y = y_out.numpy() if y_out is not None else np.empty(len(idx), np.int64)
        shards = dict.fromkeys(self.in_use)
        which = np.searchsorted(self.firsts, idx, side="right") - 1 if len(shards) > 1 else None
        for s in shards:
            images, labels = self.loaded[s]
            rows = slice(None) if which is None else np.flatnonzero(which == s)
            local = idx[rows] - self.firsts[s]
            if self.normalize is None:
                x[rows] = images.take(local, 0)
            elif which is None:
                normalize_u8_numpy(images.take(local, 0), *self.normalize, out=x)
            else:
                x[rows] = normalize_u8_numpy(images.take(local, 0), *self.normalize,
                                             out=np.empty((len(local), 1, 28, 28), np.float32))
            y[rows] = labels.take(local)
        return torch.from_numpy(x), torch.from_numpy(y)

    def _keep(self, in_use: list[int], ahead: list[int]) -> None:
        """Drop every shard not in ``in_use`` or ``ahead``, start fetching those of ``ahead``
        not yet held, then make sure those of ``in_use`` are loaded (waiting for them)."""
        self.in_use = in_use
        for held in self.loaded, self.pending:
            for s in [s for s in held if s not in in_use and s not in ahead]:
                del held[s]
        for s in ahead:
            if s not in self.loaded and s not in self.pending:
                if self.pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self.pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="fastmnist-fetch")
                self.pending[s] = self.pool.submit(self._load, s)
        for s in in_use:
            if s not in self.loaded:
                future = self.pending.pop(s, None)
                self.loaded[s] = future.result() if future is not None else self._load(s)

    def _load(self, s: int):
        shard = self.shards[s]
        data = fetch(shard["url"], shard["size"])
        if self.verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise FastMNISTError(f"{shard['url']}: sha256 differs from the manifest (corrupted)")
        return decode_shard(data, shard["count"], shard["url"])
