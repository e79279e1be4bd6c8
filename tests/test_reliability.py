"""Reliability: fuzzed IDX parsing, SIGKILL at any point of a conversion, concurrent
conversions, a file size limit, and DataLoader workers over many epochs."""

import gzip
import json
import lzma
import os
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmnist import FastMNISTError, FastMNISTLoader, convert, open_shards, verify_shards
from fastmnist.formats.idx import QMNIST_LABELS, XZ_MEMORY_LIMIT, IdxReader, read_images, read_labels

REPO = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_images(n=3) -> bytes:
    rng = np.random.default_rng(n)
    return (b"\x00\x00\x08\x03" + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
            + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())


RATIO = {"": 1, ".gz": 1032, ".xz": 7000}  # the most each can expand (xz: 6,843 for zeros)


def _compressed(data: bytes, suffix: str) -> bytes:
    return {"": bytes, ".gz": gzip.compress, ".xz": lzma.compress}[suffix](bytes(data))


def _read_qmnist_labels(path: Path) -> None:
    with IdxReader(path, QMNIST_LABELS) as f:
        for _ in f.chunks(4096):
            pass


def _read_bounded(path: Path, size: int) -> None:
    """Read with every reader (images, labels, QMNIST's int32 labels); only FastMNISTError
    may escape, and the peak Python allocation stays within what ``size`` bytes can
    decompress to (plus, for xz, the decoder's own memory, bounded by ``XZ_MEMORY_LIMIT``)."""
    tracemalloc.start()
    try:
        for reader in (read_images, read_labels, _read_qmnist_labels):
            try:
                reader(path)
            except FastMNISTError:
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000 + 2 * RATIO[path.suffix] * size + (XZ_MEMORY_LIMIT if path.suffix == ".xz" else 0)


SUFFIXES = st.sampled_from(list(RATIO))


@FUZZ
@given(data=st.binary(max_size=4000), suffix=SUFFIXES)
def test_fuzz_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(_compressed(data, suffix))
    _read_bounded(path, path.stat().st_size)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 3 * 784 + 15), st.integers(0, 255)), max_size=8),
       cut=st.integers(0, 3 * 784 + 16), suffix=SUFFIXES, compress_then_edit=st.booleans())
def test_fuzz_mutated_valid_files(tmp_path, edits, cut, suffix, compress_then_edit):
    data = bytearray(_valid_images())
    if compress_then_edit:
        data = bytearray(_compressed(data, suffix))
    for pos, value in edits:
        data[pos % len(data)] = value
    data = data[:cut] if cut < len(data) else data
    if not compress_then_edit:
        data = _compressed(data, suffix)
    path = tmp_path / f"f{suffix}"
    path.write_bytes(bytes(data))
    _read_bounded(path, len(data))


@FUZZ
@given(count=st.integers(0, 2**31 - 1), rows=st.integers(-(2**31), 2**31 - 1), suffix=SUFFIXES)
def test_fuzz_header_claims(tmp_path, count, rows, suffix):
    data = b"\x00\x00\x08\x03" + count.to_bytes(4, "big") + rows.to_bytes(4, "big", signed=True) * 2
    data += bytes(100)
    path = tmp_path / f"f{suffix}"
    path.write_bytes(_compressed(data, suffix))
    _read_bounded(path, len(data))


def test_billion_image_header_rejected_before_allocation(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"\x00\x00\x08\x03" + (10**9).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                     + bytes(84))
    tracemalloc.start()
    with pytest.raises(FastMNISTError, match="more than the 100-byte file can hold"):
        read_images(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000


CONVERT = [sys.executable, "-m", "fastmnist.cli", "convert", "--quiet"]


def _poll(condition, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = condition()
        if found:
            return found
        time.sleep(0.002)
    return None


def _partly_written(parent: Path, name: str):
    """``name`` in a conversion's temporary directory, begun but not finished, or None."""
    for tmp in parent.glob(".shards.tmp-*"):
        f = tmp / name
        if f.exists() and 0 < f.stat().st_size < 188_160_128:
            return f
    return None


KILL_POINTS = {  # observed from outside, killed at that moment
    "early": lambda parent: time.sleep(0.05) or True,  # importing (a conversion takes well under 1 s)
    "mid_float32_write": lambda parent: _partly_written(parent, "train_images_f32.npy"),
}

# Too brief to hit from outside: the process kills itself there (fault injection).
SELF_KILL = """
import importlib, os, signal, sys
from fastmnist.cli import main
convert = importlib.import_module("fastmnist.conversion.converter")
point, renames, real_rename, real_swap = sys.argv[1], [], os.rename, convert._swap_into_place
real_manifest = convert._write_manifest

def manifest(tmp, data):
    if point == "before_manifest":  # every data file written
        os.kill(os.getpid(), signal.SIGKILL)
    return real_manifest(tmp, data)

def swap(tmp, out):
    if point == "before_swap":  # the manifest written
        os.kill(os.getpid(), signal.SIGKILL)
    return real_swap(tmp, out)

def exchange(a, b):
    if point == "between_fallback_renames":  # as on a file system without RENAME_EXCHANGE
        return False
    swapped = real_exchange(a, b)
    if point == "after_exchange":  # the new set in place, the previous not yet deleted
        os.kill(os.getpid(), signal.SIGKILL)
    return swapped

def rename(src, dst):
    renames.append(src)
    if point == "between_fallback_renames" and len(renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst)

real_exchange = convert._exchange
convert._write_manifest, convert._swap_into_place, convert._exchange = manifest, swap, exchange
os.rename = rename
main(["convert", "--quiet", "--force", *sys.argv[2:]])
"""
SELF_KILL_POINTS = ["before_manifest", "before_swap", "after_exchange", "between_fallback_renames"]


def _outcome(out: Path) -> str:
    if not out.exists():
        return "nothing"
    manifest = open_shards(out, verify=True).manifest  # a set that opens is complete
    return "previous" if manifest.splits["train"].mean == 0.5 else "new"


@pytest.mark.parametrize("previous", [False, True])
def test_sigkill_leaves_the_previous_set_or_nothing(synth_root, tmp_path, previous):
    out = tmp_path / "shards"
    if previous:
        convert(synth_root, out, mean=0.5, std=0.5, progress=False)
    args = ["--root", str(synth_root), "--out", str(out)]
    outcomes = {}
    for point, reached in KILL_POINTS.items():
        proc = subprocess.Popen([*CONVERT, *args, "--force"], cwd=REPO)
        hit = _poll(lambda r=reached, p=proc: r(tmp_path) or (p.poll() is not None and "exited"))
        proc.kill()
        proc.wait()
        assert hit and hit != "exited", f"the conversion ended before: {point}"
        outcomes[point] = _outcome(out)
    # with no old set there is nothing to exchange and a single rename
    for point in SELF_KILL_POINTS if previous else ["before_manifest", "before_swap"]:
        done = subprocess.run([sys.executable, "-c", SELF_KILL, point, *args], cwd=REPO)
        assert done.returncode == -signal.SIGKILL
        outcomes[point] = _outcome(out)
    if previous:  # only the fallback's instant between two renames leaves nothing in place
        assert outcomes == {"early": "previous", "mid_float32_write": "previous",
                            "before_manifest": "previous", "before_swap": "previous",
                            "after_exchange": "new", "between_fallback_renames": "nothing"}
    else:
        assert set(outcomes.values()) == {"nothing"}, outcomes
    assert not convert(synth_root, out, force=True, progress=False).skipped
    assert verify_shards(out) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".shards.lock"]


def test_two_concurrent_conversions_end_with_one_valid_set(synth_root, tmp_path):
    out = tmp_path / "shards"
    procs = [subprocess.Popen([*CONVERT, "--root", str(synth_root), "--out", str(out), *extra],
                              cwd=REPO, stderr=subprocess.PIPE)
             for extra in ([], ["--mean", "0.5", "--std", "0.5"])]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert verify_shards(out) == []
    assert open_shards(out).split("train").mean in (0.1307, 0.5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards.")] == [".shards.lock"]


def test_reader_keeps_reading_the_old_set_while_it_is_replaced(synth_root, tmp_path):
    out = tmp_path / "shards"
    convert(synth_root, out, progress=False)
    expected = torch.from_numpy(np.array(open_shards(out).split("train").array("images_f32")))
    loader = FastMNISTLoader(out, batch_size=1000, shuffle=False)
    it = iter(loader)
    first = next(it)[0]
    convert(synth_root, out, mean=0.5, std=0.5, force=True, progress=False)
    rest = torch.cat([first] + [x for x, _ in it])
    assert torch.equal(rest, expected)  # the old mapping, not a mix
    assert open_shards(out).split("train").mean == 0.5


def test_file_size_limit_fails_cleanly_and_keeps_the_old_set(synth_root, tmp_path):
    out = tmp_path / "shards"
    convert(synth_root, out, mean=0.5, std=0.5, progress=False)
    before = json.loads((out / "manifest.json").read_text())

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, 20_000_000))

    done = subprocess.run([*CONVERT, "--root", str(synth_root), "--out", str(out), "--force"],
                          cwd=REPO, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "fastmnist: error:" in done.stderr and "cannot write: File too large" in done.stderr
    assert json.loads((out / "manifest.json").read_text()) == before
    assert verify_shards(out) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".shards.")] == [".shards.lock"]


def _rss_of_tree(pid: int) -> int:
    """Resident bytes of ``pid`` and its children."""
    pids = [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except FileNotFoundError:
            pass
    return total


def test_persistent_workers_memory_is_flat_over_many_epochs(synth_shards):
    from torch.utils.data import DataLoader

    loader = FastMNISTLoader(synth_shards, batch_size=256)
    dl = DataLoader(loader, batch_size=None, num_workers=2, persistent_workers=True)
    rss = []
    for _ in range(12):
        assert sum(len(y) for _, y in dl) == 60000
        rss.append(_rss_of_tree(os.getpid()) / 1e6)
    print(f"RSS (MB, main + workers) after each epoch: {[round(r) for r in rss]}")
    assert max(rss[2:]) - rss[2] < 30, rss


WORKER_SCRIPT = """
import signal, sys, os, time
from torch.utils.data import DataLoader
from fastmnist import FastMNISTLoader
# Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the tests run as a background
# job (which starts with SIGINT ignored, and Python then leaves it so)
signal.signal(signal.SIGINT, signal.default_int_handler)
dl = DataLoader(FastMNISTLoader(sys.argv[1], batch_size=64), batch_size=None, num_workers=2,
                persistent_workers=True)
for i, (x, y) in enumerate(dl):
    if i == 5:
        print("ready", flush=True)
        if sys.argv[2] == "raise":
            raise RuntimeError("boom in the training loop")
        time.sleep(60)
"""


@pytest.mark.parametrize("how", ["raise", "sigint"])
def test_workers_shut_down_on_errors_and_ctrl_c(synth_shards, how):
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(synth_shards), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2  # the two workers
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert ("KeyboardInterrupt" if how == "sigint" else "boom in the training loop") in err
    for child in children:  # no orphaned worker survives
        assert _poll(lambda c=child: not Path(f"/proc/{c}").exists(), timeout=10)
