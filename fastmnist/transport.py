"""Where streamed shards come from: ``http(s)://`` and ``file://`` URLs, local paths, and
``pipe:COMMAND`` (the command's standard output is the object).

A ``pipe:`` command is the user's own string; a name taken from a manifest is appended to it
only shell-quoted, and only after the manifest has checked it against the converter's names.
"""

import os
import shlex
import subprocess
import urllib.error
import urllib.request

import numpy as np

from .errors import FastMNISTError

SCHEMES = ("http://", "https://", "file://", "pipe:")
TIMEOUT_S = 60


def is_url(source) -> bool:
    """True for a URL of a scheme in ``SCHEMES``, or a list of them."""
    return isinstance(source, (list, tuple)) or (isinstance(source, str) and source.startswith(SCHEMES))


def expand_urls(source) -> list[str]:
    """A URL, a brace pattern (``train-{000000..000005}.tar``) or a list -> a list of URLs."""
    from braceexpand import braceexpand

    sources = [source] if isinstance(source, str) else list(source)
    return [url for s in sources for url in braceexpand(s)]


def join(base: str, name: str) -> str:
    """The URL of ``name`` inside the set at ``base`` (which ends in "/"); quoted for a
    ``pipe:`` command's shell."""
    return base + (shlex.quote(name) if base.startswith("pipe:") else name)


def fetch(url: str, size: int | None = None, limit: int | None = None):
    """The whole object at ``url`` (a path, ``file://``, ``http(s)://`` or ``pipe:COMMAND``).
    With ``size`` it is read straight into one uint8 array and must have exactly that many
    bytes; otherwise it is bytes, and more than ``limit`` bytes is an error."""
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
        remote = url.startswith(("http://", "https://", "file://"))
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) if remote else open(url, "rb") as f:
            length = _announced_length(f, remote)
            if size is not None and length is not None and length != size:  # before allocating
                problem = "truncated" if length < size else "longer than the manifest says"
                raise FastMNISTError(f"{url}: {problem}: {length} bytes, the manifest says {size}")
            if size is None:
                data = f.read(limit + 1 if limit is not None else -1)
                if limit is not None and len(data) > limit:
                    raise FastMNISTError(f"{url}: more than {limit} bytes")
                return data
            buf = np.empty(size, np.uint8)  # unlike bytearray, not zeroed while holding the GIL
            view, got = memoryview(buf), 0
            while got < size and (n := f.readinto(view[got:])):
                got += n
            if got < size:
                raise FastMNISTError(f"{url}: truncated: {got} bytes, the manifest says {size}")
            if f.read(1):
                raise FastMNISTError(f"{url}: longer than the {size} bytes the manifest says")
            return buf
    except urllib.error.HTTPError as e:
        raise FastMNISTError(f"{url}: HTTP error {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise FastMNISTError(f"{url}: cannot read: {getattr(e, 'reason', e)}") from None


def _announced_length(f, remote: bool) -> int | None:
    """The object's length as its server (Content-Length) or file system tells it, if it does."""
    if not remote:
        return os.fstat(f.fileno()).st_size
    length = f.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None
