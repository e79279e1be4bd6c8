"""Trust nothing: a set replaced under a live reader, labels and headers that lie, limits on
files, servers and states, two threads on one loader, and what ``info`` prints. Each case
is one the code before these checks got wrong (a traceback, a hang, or silently wrong
data); each now gets the right data or a ``FastMNISTError`` that names the problem."""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from fastmnist import FastMNISTError, FastMNISTLoader, Retry, convert
from fastmnist.cli import main
from fastmnist.conversion.synth import write_raw
from fastmnist.formats import tar
from fastmnist.formats.manifest import MANIFEST, npy_header
from fastmnist.loading.plan import set_fingerprint
from fastmnist.remote.transport import fetch
from fastmnist.store import REPLACED, open_shards

from .conftest import INDEXED_N, decode_indices

CLI = [sys.executable, "-m", "fastmnist.cli"]
STRESS_S = 30
SWAPS = """
import subprocess, sys, time
stop, roots, target = float(sys.argv[1]), sys.argv[2:-1], sys.argv[-1]
k = 0
while time.time() < stop:
    k += 1
    subprocess.run([sys.executable, "-m", "fastmnist.cli", "convert", "--root", roots[k % 3], "--out", target,
                    "--format", "both", "--force", "--quiet"], check=True)
print(k)
"""  # converts the roots into one folder in turn, until the time given


def _reference(path: Path) -> dict:
    """A converted set's train split in memory, by its fingerprint: float32 images, labels."""
    split = open_shards(path).split("train")
    return {
        set_fingerprint(split.info): (
            torch.from_numpy(np.array(split.array("images_f32"))),
            torch.from_numpy(np.array(split.array("labels"))),
        )
    }


@pytest.mark.parametrize("format", ["npy", "wds"])
def test_a_set_replaced_under_its_readers_is_never_mixed(tmp_path, format):
    """For 30 s, conversions of three different sets (3,000, 4,500 and 3,000 samples)
    replace one folder in turn with --force while readers iterate it, in this process and through
    DataLoader(num_workers=2): every batch is exactly the set its loader opened (by index,
    images and labels); a reader completes its epochs on that version or stops with the
    documented error."""
    roots = []
    for seed, n in ((1, 3000), (2, 4500), (3, 3000)):
        write_raw(tmp_path / f"raw{seed}", n, 10, seed=seed, compressed=False)
        roots.append(tmp_path / f"raw{seed}")
    references = {}
    for k, root in enumerate(roots):
        convert(root, tmp_path / f"ref{k}", format="both", progress=False)
        references.update(_reference(tmp_path / f"ref{k}"))
    target = tmp_path / "live"
    convert(roots[0], target, format="both", progress=False)
    stop = time.monotonic() + STRESS_S
    swaps = subprocess.Popen(
        [sys.executable, "-c", SWAPS, str(time.time() + STRESS_S), *map(str, roots), str(target)],
        stdout=subprocess.PIPE,
        text=True,
    )
    epochs = refused = 0
    checked = 0
    try:
        while time.monotonic() < stop:
            for workers in (0, 2):
                try:
                    loader = FastMNISTLoader(target, batch_size=500, seed=epochs, format=format)
                except FastMNISTError as e:
                    assert REPLACED in str(e) or "no such directory" in str(e), e
                    refused += 1
                    continue
                images, labels = references[loader._plan.identity["set"]]
                order = loader.rank_order(0)
                batches = DataLoader(loader, batch_size=None, num_workers=workers) if workers else loader
                for b, (x, y) in enumerate(batches):
                    idx = order[b * 500 : (b + 1) * 500]
                    assert torch.equal(x, images[idx]) and torch.equal(y, labels[idx]), (epochs, b)
                    checked += 1
                epochs += 1
    finally:
        swaps.wait(timeout=120)
    conversions = int(swaps.stdout.read())
    assert swaps.returncode == 0 and conversions >= 5 and epochs >= 10 and checked > 0
    print(f"{format}: {conversions} conversions, {epochs} epochs read exactly, {refused} opens refused")


def test_spawned_workers_refuse_a_replaced_set(tmp_path, synth_root):
    """A DataLoader worker started with 'spawn' opens the files itself: if the set was
    replaced since the loader opened it, the worker stops with the documented error."""
    out = tmp_path / "set"
    convert(synth_root, out, progress=False)
    loader = FastMNISTLoader(out, batch_size=1000)
    assert main(["convert", "--root", str(synth_root), "--out", str(out), "--force", "--quiet"]) == 0
    assert sum(len(y) for _, y in loader) == 60000  # in this process: the version it opened
    spawned = DataLoader(loader, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(Exception, match="the set was replaced after it was opened"):
        next(iter(spawned))


def _wds_set(tmp_path, n=40) -> Path:
    root = tmp_path / "raw"
    write_raw(root, n, 10, compressed=False)
    out = tmp_path / "set"
    convert(root, out, format="wds", shard_size=20, progress=False)
    return out


def test_a_changed_tar_label_is_caught_without_verify(tmp_path):
    """A .cls digit changed to another valid digit: the layout is intact, the sha256 unread
    without verify=True, but the shard's label digest in the manifest no longer matches."""
    out = _wds_set(tmp_path)
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    at = 3 * tar.RECORD + tar.LABEL  # sample 3's label digit
    data[at] = ord("7") if data[at] != ord("7") else ord("2")
    path.write_bytes(bytes(data))
    with pytest.raises(
        FastMNISTError, match=r"train-000001.tar: its labels differ from the manifest's labels_sha256"
    ):
        list(FastMNISTLoader(out, batch_size=10))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_outside_the_pixels_changed_is_caught(tmp_path_factory, data):
    """Hypothesis: any byte of a shard outside the pixels, changed to any other value, is a
    FastMNISTError naming the shard (the labels by their digest, the rest by the layout)."""
    n = 7
    images = np.arange(n * 784, dtype=np.uint8).reshape(n, 1, 28, 28)
    labels = np.arange(n) % 10
    shard = bytearray(tar.records(40, images, labels).tobytes() + tar.archive_padding(n).tobytes())
    pixels = {r * tar.RECORD + tar.IMAGE + k for r in range(n) for k in range(tar.PIXELS)}
    offset = data.draw(st.integers(0, len(shard) - 1).filter(lambda o: o not in pixels))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != shard[offset]))
    shard[offset] = value
    with pytest.raises(FastMNISTError, match="s.tar"):
        tar.decode_shard(bytes(shard), 40, n, "s.tar", 10, tar.labels_digest(labels))


def test_a_fortran_order_header_is_refused(tmp_path, indexed_shards):
    """The same length, 'fortran_order': True: every image would come out transposed."""
    out = tmp_path / "set"
    out.mkdir()
    for f in indexed_shards.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    path = out / "train_images_f32.npy"
    data = path.read_bytes().replace(b"'fortran_order': False", b"'fortran_order': True ")
    path.write_bytes(data)
    with pytest.raises(FastMNISTError, match=r"train_images_f32.npy: .npy header differs") as refused:
        next(iter(FastMNISTLoader(out)))
    assert str(refused.value).endswith(f"found {data[:120]!r}")  # the header's first 120 bytes shown


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_npy_header_byte_changed_is_refused(tmp_path_factory, indexed_shards, data):
    """Hypothesis: any byte of the labels array's header (shape, dtype, order, padding, the
    magic) changed to any other value: refused before a batch is made."""
    out = tmp_path_factory.mktemp("npy")
    for f in indexed_shards.iterdir():
        if f.name != "train_labels.npy":
            os.link(f, out / f.name)
    header = npy_header("int64", (INDEXED_N,))
    body = (indexed_shards / "train_labels.npy").read_bytes()[len(header) :]
    offset = data.draw(st.integers(0, len(header) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != header[offset]))
    (out / "train_labels.npy").write_bytes(header[:offset] + bytes([value]) + header[offset + 1 :] + body)
    with pytest.raises(FastMNISTError, match=r"train_labels.npy"):
        next(iter(FastMNISTLoader(out, normalize=False)))


def _edited_manifest(source: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "edited"
    out.mkdir()
    for f in source.iterdir():
        if f.name != MANIFEST:
            os.link(f, out / f.name)
    manifest = json.loads((source / MANIFEST).read_text())
    edit(manifest["splits"]["train"])
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mean", 1e308, r"splits.train.mean: expected a number in \[0, 1\]"),
        ("std", 1e-320, r"splits.train.std: expected a number in \[0.0001, 1\]"),
        ("std", 2.0, r"splits.train.std: expected a number in \[0.0001, 1\]"),
        (
            "mean",
            0.5,
            r"train_images_f32.npy: sample 0 is not the uint8 image normalised with the manifest's mean 0.5",
        ),
    ],
)
def test_mean_and_std_that_lie_are_refused(tmp_path, indexed_shards, field, value, message):
    out = _edited_manifest(indexed_shards, tmp_path, lambda split: split.update({field: value}))
    with pytest.raises(FastMNISTError, match=message):
        next(iter(FastMNISTLoader(out, verify=True)))


def _state_after(loader, batches: int) -> dict:
    it = iter(loader)
    for _ in range(batches):
        next(it)
    return loader.state_dict()


def test_a_state_whose_consumed_does_not_follow_from_its_step_is_refused(indexed_shards):
    state = _state_after(FastMNISTLoader(indexed_shards, batch_size=10), 30)
    state["consumed"] = [[0, 1000]]
    with pytest.raises(FastMNISTError, match="is not what its step .* implies; the state is damaged"):
        FastMNISTLoader(indexed_shards, batch_size=10).load_state_dict(state)


@pytest.mark.parametrize("key, value", [("world_size", 10**9), ("workers", 10**9), ("batch_size", 10**12)])
def test_huge_counts_in_a_state_are_refused_before_anything_is_allocated(indexed_shards, key, value):
    state = _state_after(FastMNISTLoader(indexed_shards, batch_size=10), 3)
    state["step"][
        ["base", "batches_done", "anchor", "batch_size", "world_size", "drop_last", "even", "workers"].index(
            key
        )
    ] = value
    torchdata_shaped = {"_snapshot": {"_worker_snapshots": {"0": {"dataset_state": state}}}}
    start = time.monotonic()
    with pytest.raises(FastMNISTError, match=f"step's {key} must be an integer in"):
        FastMNISTLoader(indexed_shards, batch_size=10).load_state_dict(torchdata_shaped)
    assert time.monotonic() - start < 1


def test_a_torchdata_state_without_worker_snapshots_is_refused(indexed_shards):
    with pytest.raises(FastMNISTError, match="no worker snapshot"):
        FastMNISTLoader(indexed_shards).load_state_dict({"_snapshot": {"_worker_snapshots": {}}})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_state_field_made_inconsistent_is_refused_or_exact(indexed_shards, data):
    """Hypothesis: a mid-epoch state with one number changed (an interval bound, batches
    done, the anchor, the batch size, the world size, the workers). Either it is refused,
    or it still describes a consistent point of the epoch, and then the rest of the epoch
    is every sample outside its consumed positions, exactly once."""
    loader = FastMNISTLoader(indexed_shards, batch_size=data.draw(st.sampled_from([7, 64])), normalize=False)
    state = _state_after(loader, data.draw(st.integers(1, 10)))
    where = data.draw(
        st.sampled_from(["consumed", "batches_done", "anchor", "batch_size", "world_size", "workers"])
    )
    delta = data.draw(st.integers(-40, 40).filter(bool))
    if where == "consumed":
        state["consumed"][0][1] += delta
    else:
        index = [
            "base",
            "batches_done",
            "anchor",
            "batch_size",
            "world_size",
            "drop_last",
            "even",
            "workers",
        ].index(where)
        state["step"][index] += delta
    resumed = FastMNISTLoader(indexed_shards, batch_size=64, normalize=False)
    # an anchor only says which DataLoader worker takes which batch: any one >= 0 is consistent,
    # so these cases must reach the exactness check below
    consistent = where == "anchor" and state["step"][2] >= 0
    try:
        resumed.load_state_dict(state)
    except FastMNISTError:
        assert not consistent, state
        return
    order = resumed._plan.source.order(0, 0, True).tolist()
    consumed = {order[p] for start, stop in state["consumed"] for p in range(start, stop)}
    rest = [i for x, _ in resumed for i in decode_indices(x)]
    assert sorted(rest) == sorted(set(range(INDEXED_N)) - consumed)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_non_regular_raw_inputs_and_manifests_are_refused_at_once(tmp_path, synth_root, kind):
    """A raw input or a manifest that is a FIFO, /dev/zero or a directory: refused naming
    it, in well under a second (a FIFO used to hang convert; /dev/zero to eat memory)."""
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (synth_root / "MNIST" / "raw").glob("*-ubyte"):
        os.link(f, raw / f.name)
    victim = raw / "train-labels-idx1-ubyte"
    victim.unlink()
    set_dir = tmp_path / "set"
    convert(synth_root, set_dir, progress=False)
    manifest = set_dir / MANIFEST
    manifest.unlink()
    for path in (victim, manifest):
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "device":
            path.symlink_to("/dev/zero")
        else:
            path.mkdir()
    expected = {"fifo": "a FIFO", "device": "a device", "directory": "a directory"}[kind]
    start = time.monotonic()
    with pytest.raises(FastMNISTError, match=f"train-labels-idx1-ubyte: not a regular file \\({expected}\\)"):
        convert(tmp_path / "root", tmp_path / "out", progress=False)
    with pytest.raises(FastMNISTError, match=f"manifest.json: not a regular file \\({expected}\\)"):
        FastMNISTLoader(set_dir)
    assert time.monotonic() - start < 5


class _Misbehaving(http.server.BaseHTTPRequestHandler):
    """Serves one 4,000-byte object, misbehaving as ``mode`` says: ``trickle`` a byte every
    50 ms; ``announce more`` (a Content-Length and a body 8 bytes longer); ``send more``
    (8 bytes after the announced length)."""

    body = bytes(range(256)) * 15 + bytes(160)
    mode = "trickle"

    def do_GET(self):  # noqa: N802 (http.server's name)
        sent = self.body + b"and more" if self.mode != "trickle" else self.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(sent) if self.mode == "announce more" else len(self.body)))
        self.end_headers()
        try:
            if self.mode == "trickle":
                for b in self.body:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.wfile.write(sent)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def misbehaving():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/object"
    server.shutdown()


def test_total_s_bounds_a_body_that_trickles_in(misbehaving):
    """One byte every 50 ms never trips the 1 s read timeout; total_s=2 still ends it."""
    _Misbehaving.mode = "trickle"
    start = time.monotonic()
    with pytest.raises(FastMNISTError, match=r"not complete within 2 s \(Retry.total_s\)"):
        fetch(misbehaving, 4000, retry=Retry(attempts=3, total_s=2, timeout_s=1))
    assert time.monotonic() - start < 3.5


def test_a_server_that_sends_more_than_it_should(misbehaving):
    """Announcing more than the manifest's size: refused before anything is allocated;
    sending bytes past its own Content-Length: they are not part of the object."""
    _Misbehaving.mode = "announce more"
    with pytest.raises(
        FastMNISTError, match="longer than the manifest says: 4008 bytes, the manifest says 4000"
    ):
        fetch(misbehaving, 4000, retry=Retry(attempts=2, total_s=5, timeout_s=1))
    _Misbehaving.mode = "send more"
    assert (
        fetch(misbehaving, 4000, retry=Retry(attempts=2, total_s=5, timeout_s=1)).tobytes()
        == _Misbehaving.body
    )


def test_the_default_deadline_is_a_minute():
    assert Retry().total_s == 60 and Retry().timeout_s == 20


def test_a_second_thread_is_refused_not_a_traceback(tmp_path):
    """Two threads iterating one loader streaming over file://: the second gets the
    documented error; the first finishes its epoch with every sample."""
    out = _wds_set(tmp_path, n=200)
    loader = FastMNISTLoader(f"file://{out}/", batch_size=10)
    first = iter(loader)
    got = [next(first)]
    errors = []

    def other():
        try:
            next(iter(loader))
        except FastMNISTError as e:
            errors.append(str(e))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    got += list(first)
    assert errors == [
        "this loader is being iterated by another thread; give each thread its own "
        "FastMNISTLoader (they share the page cache)"
    ]
    assert sum(len(y) for _, y in got) == 200
    thread = threading.Thread(target=lambda: errors.append(sum(len(y) for _, y in loader)))
    thread.start()
    thread.join()
    assert errors[-1] == 200  # once the first epoch is over, another thread may iterate


def test_info_escapes_what_a_manifest_says(tmp_path, indexed_shards):
    """A manifest whose dataset and creator hold terminal escapes (retitle, cursor moves):
    printed as escapes, never sent to the terminal."""
    out = tmp_path / "set"
    out.mkdir()
    for f in indexed_shards.iterdir():
        os.link(f, out / f.name)
    manifest = json.loads((indexed_shards / MANIFEST).read_text())
    manifest["dataset"] = "mnist\x1b]0;owned\x07\x1b[2J"
    manifest["created_by"] = "x\r\x1b[1A"
    (out / MANIFEST).write_text(json.dumps(manifest))
    done = subprocess.run([*CLI, "info", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\r" not in done.stdout
    assert "mnist\\x1b]0;owned\\x07\\x1b[2J" in done.stdout and "x\\r\\x1b[1A" in done.stdout


def test_convert_escapes_a_hostile_name_in_its_error(tmp_path):
    """An input whose file name holds terminal escapes, refused by ``convert``: the error line
    names it escaped, as ``info`` prints a manifest's text, never raw."""
    hostile = tmp_path / "digits\x1b]0;owned\x07\x1b[2J.csv"
    hostile.write_text("label,pixel0\n3,not-a-number\n")
    done = subprocess.run([*CLI, "convert", str(hostile), "--out", str(tmp_path / "set")],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("fastmnist: error: ")
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr
    assert "digits\\x1b]0;owned\\x07\\x1b[2J.csv" in done.stderr


def test_nothing_is_read_from_a_hostile_npy_body_before_its_header_is_checked(tmp_path, indexed_shards):
    """A labels file whose header is replaced by one claiming a huge shape is refused by
    the exact header comparison, not by numpy's allocation."""
    out = tmp_path / "set"
    out.mkdir()
    for f in indexed_shards.iterdir():
        if f.name != "train_labels.npy":
            os.link(f, out / f.name)
    header = npy_header("int64", (INDEXED_N,))
    hostile = npy_header("int64", (10**15,))[: len(header)]
    body = (indexed_shards / "train_labels.npy").read_bytes()[len(header) :]
    (out / "train_labels.npy").write_bytes(hostile + body)
    with pytest.raises(FastMNISTError, match="train_labels.npy: .npy header differs"):
        next(iter(FastMNISTLoader(out, normalize=False)))


@pytest.mark.parametrize("change", ["one label", "another set's labels"])
def test_changed_npy_labels_are_caught_without_verify(tmp_path, change):
    """An .npy set's labels, one changed to another valid class or the whole file swapped
    for another valid set's of the same size: refused at the first batch, without
    verify=True, naming the file (the images are not hashed; the labels are 480 KB)."""
    root, other_root = tmp_path / "raw", tmp_path / "other_raw"
    write_raw(root, 40, 10, compressed=False)
    write_raw(other_root, 40, 10, compressed=False, seed=1)
    out, other = tmp_path / "set", tmp_path / "other"
    convert(root, out, progress=False)
    convert(other_root, other, progress=False)
    path = out / "train_labels.npy"
    if change == "one label":
        labels = np.load(path)
        labels[5] = (labels[5] + 1) % 10
        np.save(path, labels)
    else:
        before = np.load(path)
        shutil.copyfile(other / "train_labels.npy", path)
        assert (np.load(path) != before).any()  # a valid file of the same size, other labels
    with pytest.raises(FastMNISTError, match=r"train_labels.npy: sha256 differs from the manifest"):
        next(iter(FastMNISTLoader(out, batch_size=10)))


def test_one_float32_pixel_changed_is_caught_without_verify(tmp_path, synth_root):
    """One pixel of one float32 image in the middle of the set changed to another valid
    float (the file's size and header intact, ``verify=False``): refused at the first batch,
    naming the sample, before any float32 batch is yielded; ``images="uint8"`` reads on."""
    out = tmp_path / "set"
    convert(synth_root, out, splits=["test"], progress=False)
    images = np.load(out / "test_images_f32.npy", mmap_mode="r+")
    images[5003, 0, 14, 14] += np.float32(1 / 255 / 0.3081)  # one grey level brighter
    images.flush()
    del images
    with pytest.raises(FastMNISTError, match=r"test_images_f32\.npy: sample 5003 is not the uint8 image"):
        next(iter(FastMNISTLoader(out, "test", batch_size=10)))
    assert len(next(iter(FastMNISTLoader(out, "test", batch_size=10, images="uint8")))[0]) == 10
