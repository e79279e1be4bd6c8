"""Files: opened for reading only when regular (``open_regular``), hashed block by block
(``hashed``), and written on a background thread (``BackgroundWriter``): each chunk hashed
(sha256) and appended in order, each file fsynced when complete, while the caller computes
the next chunk.

Each chunk's write-back to disk is started as soon as it is written (Linux
``sync_file_range``), so the disk works while the next chunks are computed and the final
fsync finds little left to wait for.
"""

import ctypes
import hashlib
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import FastMNISTError, MissingFileError


def open_regular(path, dir_fd: int | None = None, shown=None):
    """``path`` (relative to the directory ``dir_fd`` when given) opened for binary reading
    if it is a regular file (after symbolic links); a FIFO, a device, a socket or a
    directory is refused with a ``FastMNISTError`` naming it (as ``shown``, if given).
    Opened non-blocking first, so that a FIFO cannot hang the open itself."""
    shown = path if shown is None else shown
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise MissingFileError(f"{shown}: file not found") from None
    except OSError as e:
        raise FastMNISTError(f"{shown}: cannot open: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"
        raise FastMNISTError(f"{shown}: not a regular file ({kind})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def hash_file(path, *hashes) -> int:
    """``hashes`` fed the whole regular file at ``path``; its size in bytes."""
    with open_regular(path) as f:
        hashed(f, *hashes)
        return os.fstat(f.fileno()).st_size


def hashed(f, *hashes, block: int = 1 << 22) -> tuple:
    """``hashes`` (``hashlib`` objects) fed the binary file ``f`` from where it stands to its
    end, ``block`` bytes at a time."""
    while chunk := f.read(block):
        for h in hashes:
            h.update(chunk)
    return hashes


class BackgroundWriter:
    """Use as a context manager; leaving it waits for every write and raises the first
    error (an ``OSError`` naming what failed). At most ``depth`` chunks wait in memory."""

    def __init__(self, depth: int = 8):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastmnist-write")
        self._room = threading.BoundedSemaphore(depth)
        self._open = []
        self._error = None

    def open(self, path: Path, entry: dict) -> tuple:
        """A new file at ``path`` to :meth:`append` to; once :meth:`close` has it on disk,
        ``entry["size"]`` and ``entry["sha256"]`` (hex) are set."""
        f = open(path, "wb", buffering=0)
        self._open.append(f)
        return f, hashlib.sha256(), entry

    def append(self, target: tuple, chunk) -> None:
        """Queue ``chunk`` (bytes or a C-contiguous array, kept unchanged until written)."""
        f, sha, _ = target
        self._submit(_append, f, sha, memoryview(chunk).cast("B"))

    def close(self, target: tuple) -> None:
        self._submit(_finish, *target)

    def _submit(self, fn, *args) -> None:
        if self._error is not None:
            raise self._error
        self._room.acquire()
        self._pool.submit(self._run, fn, args)

    def _run(self, fn, args):
        try:
            if self._error is None:  # after a failure, the rest is skipped
                fn(*args)
        except BaseException as e:
            self._error = e
        finally:
            self._room.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True)
        for f in self._open:
            f.close()
        if self._error is not None and exc[0] is None:
            raise self._error


def _append(f, sha, chunk: memoryview) -> None:
    sha.update(chunk)
    start = f.tell()
    while chunk:  # an unbuffered write may write less than asked
        chunk = chunk[f.write(chunk):]
    _start_write_back(f.fileno(), start, f.tell() - start)


def _finish(f, sha, entry: dict) -> None:
    os.fsync(f.fileno())
    entry["size"], entry["sha256"] = f.tell(), sha.hexdigest()
    f.close()


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _start_write_back(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing that range to disk now, without waiting for it (a
    no-op where the C library has no ``sync_file_range``; fsync still makes it durable)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
