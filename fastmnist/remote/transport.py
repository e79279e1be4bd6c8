"""Where streamed shards come from: ``http(s)://`` and ``file://`` URLs, local paths,
``pipe:COMMAND`` (the command's standard output is the object), and every other URL
through fsspec (``s3://``, ``gs://``, ``az://``, ``hf://``, ``memory://``, ...: the
``[cloud]`` extra), with its ``storage_options`` (endpoint, credentials, ``anon``).

A ``pipe:`` command is the user's own string; a name taken from a manifest is appended to it
only shell-quoted, and only after the manifest has checked it against the converter's names.
"""

import http.client
import logging
import os
import random
import re
import shlex
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import numpy as np

from ..errors import FastMNISTError
from ..formats.files import open_regular

log = logging.getLogger("fastmnist")
CLOUD_HINT = "pip install 'fastmnist[cloud]' (fsspec and s3fs; other stores need their fsspec backend)"
SCHEME = r"[a-zA-Z][\w+.-]*://"  # a URL's start, as fsspec reads it
CHUNK = 1 << 24  # bytes per fsspec read: a failed read resumes from the last whole chunk


def is_url(source) -> bool:
    """True for ``pipe:COMMAND``, a ``scheme://`` URL, or a list of them."""
    if isinstance(source, (list, tuple)):
        return True
    return isinstance(source, str) and (source.startswith("pipe:") or re.match(SCHEME, source) is not None)


def expand_urls(source) -> list[str]:
    """A URL, a brace pattern (``train-{000000..000005}.tar``) or a list -> a list of URLs."""
    from braceexpand import braceexpand

    sources = [source] if isinstance(source, str) else list(source)
    return [url for s in sources for url in braceexpand(s)]


def join(base: str, name: str) -> str:
    """The URL of ``name`` inside the set at ``base`` (which ends in "/"); quoted for a
    ``pipe:`` command's shell."""
    return base + (shlex.quote(name) if base.startswith("pipe:") else name)


@dataclass(frozen=True)
class Retry:
    """How remote fetches ride out transient failures: connections reset or refused, reads
    that stall for ``timeout_s``, HTTP 408, 429 and 5xx (S3's 503 SlowDown among them), and
    fsspec's I/O errors. At most ``attempts`` tries and ``total_s`` seconds per object,
    waiting ``backoff_s``, then twice as long each time (times a random 0.5-1.5), and
    resuming from the byte reached (HTTP Range, from the start where the server ignores
    ranges; fsspec: from the last whole ``CHUNK``). ``total_s`` bounds the whole fetch, a
    body that trickles in included; ``timeout_s`` one wait for the server. Other errors
    (404, 403, missing credentials, ...) fail at once."""

    attempts: int = 8
    total_s: float = 60.0
    timeout_s: float = 20.0
    backoff_s: float = 0.1


TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_RETRY = Retry()


def fetch(url: str, size: int | None = None, limit: int | None = None, retry: Retry = DEFAULT_RETRY,
          storage_options: dict | None = None, stop: threading.Event | None = None):
    """The whole object at ``url`` (a path, ``file://``, ``http(s)://``, ``pipe:COMMAND`` or
    an fsspec URL opened with ``storage_options``). With ``size`` it is read straight into
    one uint8 array and must have exactly that many bytes; otherwise it is bytes, and more
    than ``limit`` bytes is an error. Remote fetches retry as ``retry`` says, unless ``stop``
    is set (whoever wanted the object is gone)."""
    try:
        if url.startswith("pipe:"):
            done = subprocess.run(url[5:], shell=True, capture_output=True, check=False)
            if done.returncode != 0:
                raise FastMNISTError(f"{url}: command exited {done.returncode}: "
                                     f"{done.stderr.decode(errors='replace').strip()[-300:]}")
            data = done.stdout
            if size is not None and len(data) != size:
                raise FastMNISTError(f"{url}: {len(data)} bytes, the manifest says {size}")
            if limit is not None and len(data) > limit:
                raise FastMNISTError(f"{url}: more than {limit} bytes")
            return np.frombuffer(data, np.uint8) if size is not None else data
        if url.startswith(("http://", "https://")):
            deadline = time.monotonic() + retry.total_s
            return _retrying(url, retry, _http_attempts(url, size, limit, retry, deadline), stop)
        if not url.startswith("file://") and is_url(url):
            return _retrying(url, retry, _fsspec_attempts(url, size, limit, storage_options), stop)
        # a local file (a path or file://), which must be a regular one: a FIFO would hang the read
        local = urllib.request.url2pathname(urllib.parse.urlsplit(url).path) \
            if url.startswith("file://") else url
        with open_regular(local, shown=url) as f:
            return _read(url, f, size, limit, _announced_length(f), 0, None)[1]
    except _Partial as e:  # a local read that failed part way: nothing to retry
        raise FastMNISTError(f"{url}: cannot read: {e.error}") from None
    except urllib.error.HTTPError as e:
        raise FastMNISTError(f"{url}: HTTP error {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        raise FastMNISTError(f"{url}: cannot read: {getattr(e, 'reason', e)}") from None


class _Transient(Exception):
    """A failed attempt worth retrying; the next one starts at byte ``got``."""

    def __init__(self, error: str, got: int = 0):
        super().__init__(error)
        self.error, self.got = error, got


def _retrying(url: str, retry: Retry, attempt, stop: threading.Event | None = None):
    """``attempt()``'s result, calling it again (after a backoff) while it raises
    ``_Transient``, within ``retry``'s bounds and until ``stop`` is set; then a
    FastMNISTError with the last error."""
    start = time.monotonic()
    for n in range(1, retry.attempts + 1):
        try:
            return attempt()
        except _Transient as e:
            error, got = e.error, e.got
        wait = retry.backoff_s * 2 ** (n - 1) * random.uniform(0.5, 1.5)
        if n == retry.attempts or time.monotonic() - start + wait > retry.total_s \
                or stop is not None and stop.is_set():
            break
        log.warning("%s: attempt %d of %d failed (%s); retrying in %.2f s from byte %d",
                    url, n, retry.attempts, error, wait, got)
        if stop is None:
            time.sleep(wait)
        elif stop.wait(wait):
            break
    raise FastMNISTError(f"{url}: failed after {n} attempts in {time.monotonic() - start:.1f} s "
                         f"(at most {retry.attempts} in {retry.total_s:g} s); last error: {error}")


def _http_attempts(url: str, size: int | None, limit: int | None, retry: Retry, deadline: float):
    """One attempt at fetching ``url`` over HTTP(S) per call, each resuming from the byte
    the last one reached, none waiting past ``deadline`` (``time.monotonic()``)."""
    got, buf = 0, None

    def attempt():
        nonlocal got, buf
        try:
            headers = {"Range": f"bytes={got}-"} if got and size is not None else {}
            wait = max(0.001, min(retry.timeout_s, deadline - time.monotonic()))
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=wait) as f:
                if got and not _resumes_at(f, got, size):
                    got = 0  # the server sent the whole object: start over
                length = _announced_length(f)
                with _Watchdog(f, deadline) as watchdog:
                    got, buf = _read(url, f, size, limit, None if length is None else got + length, got, buf)
                if watchdog.fired:  # what arrived may have been cut short: not the object
                    past_deadline()
                return buf
        except urllib.error.HTTPError as e:
            if e.code not in TRANSIENT_STATUS:
                raise FastMNISTError(f"{url}: HTTP error {e.code} {e.reason}") from None
            raise _Transient(f"HTTP error {e.code} {e.reason}", got) from None
        except _Partial as e:  # the connection ended early: keep what arrived
            got, buf = e.got, e.buf
            past_deadline()
            raise _Transient(e.error, got) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            past_deadline()
            raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}", got) from None

    def past_deadline():
        if time.monotonic() >= deadline:
            raise FastMNISTError(f"{url}: not complete within {retry.total_s:g} s (Retry.total_s): "
                                 f"{got} bytes arrived") from None

    return attempt


def filesystem(url: str, storage_options: dict | None = None):
    """``(fsspec file system, path)`` for ``url``; errors say what to install."""
    try:
        import fsspec
    except ImportError:
        raise FastMNISTError(f"{url}: reading this URL needs fsspec: {CLOUD_HINT}") from None
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        raise FastMNISTError(f"{url}: {e}; {CLOUD_HINT}") from None
    except (ValueError, TypeError) as e:
        raise FastMNISTError(f"{url}: {e}") from None


def store_error(url: str, e: Exception) -> FastMNISTError:
    """The FastMNISTError for a failure of an fsspec file system that is not worth retrying."""
    if isinstance(e, FileNotFoundError):
        return FastMNISTError(f"{url}: not found")
    if isinstance(e, PermissionError):
        return FastMNISTError(f"{url}: access denied ({e}); check the credentials in storage_options")
    hint = "; pass credentials in storage_options (or anon=True)" if "credential" in str(e).lower() else ""
    return FastMNISTError(f"{url}: {type(e).__name__}: {e}{hint}")


def _fsspec_attempts(url: str, size: int | None, limit: int | None, storage_options: dict | None):
    """One attempt at fetching ``url`` through fsspec per call, in ``CHUNK`` reads, each
    attempt resuming from the last whole chunk."""
    fs, path = filesystem(url, storage_options)
    got, buf = 0, None

    def attempt():
        nonlocal got, buf
        try:
            if buf is None:
                length = fs.size(path)
                if size is None:
                    if limit is not None and length > limit:
                        raise FastMNISTError(f"{url}: more than {limit} bytes")
                    return bytes(fs.cat_file(path, start=0, end=length))
                _check_length(url, length, size)  # before allocating
                buf = np.empty(size, np.uint8)
            while got < size:
                chunk = fs.cat_file(path, start=got, end=min(got + CHUNK, size))
                if not chunk:
                    raise FastMNISTError(f"{url}: truncated: {got} bytes, the manifest says {size}")
                buf[got:got + len(chunk)] = np.frombuffer(chunk, np.uint8)
                got += len(chunk)
            return buf
        except FastMNISTError:
            raise
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            raise store_error(url, e) from None
        except (OSError, TimeoutError) as e:  # connection and server errors, as backends raise them
            raise _Transient(f"{type(e).__name__}: {e}", got) from None
        except Exception as e:  # a backend's own exception (missing credentials, ...): not transient
            raise store_error(url, e) from None

    return attempt


def _check_length(url: str, length: int, size: int) -> None:
    """Refuse an object whose announced ``length`` is not the ``size`` the manifest says."""
    if length != size:
        problem = "truncated" if length < size else "longer than the manifest says"
        raise FastMNISTError(f"{url}: {problem}: {length} bytes, the manifest says {size}")


class _Partial(Exception):
    """A read that ended early, with what arrived: ``buf[:got]``."""

    def __init__(self, got: int, buf, error: str):
        super().__init__(error)
        self.got, self.buf, self.error = got, buf, error


def _read(url: str, f, size: int | None, limit: int | None, length: int | None, got: int, buf):
    """Read the rest of the object from ``f`` into ``buf`` from byte ``got`` on: ``(got,
    buf)``, buf a uint8 array of ``size`` (allocated once the announced ``length`` agrees
    with it), or bytes, at most ``limit`` of them, when ``size`` is None (read whole each
    time). A read that ends early raises ``_Partial`` with what arrived."""
    if size is None:
        data = bytearray()
        try:
            while chunk := f.read(1 << 20):
                data += chunk
                if limit is not None and len(data) > limit:
                    raise FastMNISTError(f"{url}: more than {limit} bytes")
        except (OSError, http.client.HTTPException) as e:
            raise _Partial(0, None, f"{type(e).__name__}: {e}") from None
        # http.client's read(n) ends quietly where a server closed the connection early
        if isinstance(f, http.client.HTTPResponse) and length is not None and len(data) < length:
            raise _Partial(0, None, f"connection closed after {len(data)} of {length} bytes")
        return len(data), bytes(data)
    if length is not None:
        _check_length(url, length, size)  # before allocating
    if buf is None:
        buf = np.empty(size, np.uint8)  # unlike bytearray, not zeroed while holding the GIL
    view = memoryview(buf)
    try:
        while got < size and (n := f.readinto(view[got:])):
            got += n
    except (OSError, http.client.HTTPException) as e:
        raise _Partial(got, buf, f"{type(e).__name__}: {e}") from None
    if got < size:
        if isinstance(f, http.client.HTTPResponse):
            raise _Partial(got, buf, f"connection closed after {got} of {size} bytes")
        raise FastMNISTError(f"{url}: truncated: {got} bytes, the manifest says {size}")
    if f.read(1):
        raise FastMNISTError(f"{url}: longer than the {size} bytes the manifest says")
    return got, buf


class _Watchdog:
    """Shuts the connection of the response ``f`` down at ``deadline`` (``time.monotonic()``),
    so that a read blocked on a server that stalls or trickles ends there: reads stay
    whole (straight into the buffer) and the deadline still holds."""

    def __init__(self, f, deadline: float):
        self.timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._cut, (f.fileno(),))
        self.timer.daemon = True
        self.fired = False

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()

    def _cut(self, fd: int) -> None:
        self.fired = True
        connection = socket.socket(fileno=fd)
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            connection.detach()  # the response still owns the descriptor


def _resumes_at(f, got: int, size: int) -> bool:
    """Whether a response to ``Range: bytes=got-`` is that range of a ``size``-byte object."""
    return f.status == 206 and f.headers.get("Content-Range", "") == f"bytes {got}-{size - 1}/{size}"


def _announced_length(f) -> int | None:
    """The length of what ``f`` will give, as its server (Content-Length) or file system
    tells it, if it does."""
    if not hasattr(f, "headers"):
        return os.fstat(f.fileno()).st_size
    length = f.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None
