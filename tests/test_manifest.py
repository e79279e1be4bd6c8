"""Hostile manifests, local, over HTTP and through ``pipe:``: only ``FastMNISTError``, no
file outside the set opened, no command but the user's run, allocation bounded; errors
name the manifest and the field."""

import copy
import functools
import json
import re
import shutil
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmnist import FastMNISTError, FastMNISTLoader, convert
from fastmnist.formats.manifest import parse_manifest

from .conftest import INDEXED_N, indexed_images, served, write_split

PEAK_BYTES = 64 << 20  # what one case may allocate at most (the set itself is 2 MB)
CANARY = "{canary}"  # replaced by the canary file's path in each case
HOSTILE_NAMES = [
    "../secret.npy", "../secret-000000.tar", "{secret}", "/etc/passwd", "a/b.npy", "..", ".", "",
    "train_images_f32.npy\x00", "train-000000.tar; touch {canary}; echo ", "$(touch {canary})",
    "`touch {canary}`", "train-000000.tar|touch {canary}", "train-000000.tar\ntouch {canary}",
    "~/train-000000.tar", "train-000000.tar ", "TRAIN-000000.tar", "train-0.tar", "train-1000000.tar",
]
HOSTILE_VALUES = st.one_of(
    st.sampled_from(HOSTILE_NAMES), st.text(max_size=20),
    st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 2**31, 2**62, 10**12, 10**8 + 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.lists(st.integers(-5, 2**40), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4), max_leaves=20)
def _fuzz(cases: int):
    return settings(max_examples=cases, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A valid set (npy + tar shards of 200) with its manifest, and files beside it that a
    hostile manifest might point at."""
    root = tmp_path_factory.mktemp("hostile")
    write_split(root, "train", indexed_images(INDEXED_N), np.arange(INDEXED_N) % 10)
    write_split(root, "test", indexed_images(10), np.arange(10) % 10)
    convert(root, root / "set", format="both", shard_size=200, progress=False)
    np.save(root / "secret.npy", np.zeros((INDEXED_N, 1, 28, 28), np.float32))
    shutil.copy(root / "set" / "train-000000.tar", root / "secret-000000.tar")
    return root, json.loads((root / "set" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def server(hostile):
    with served(hostile[0]) as base:
        yield base + "set/"


class _Audit:
    """Files opened and commands run while ``recording`` (a ``sys.addaudithook`` hook, which
    cannot be removed: it records nothing outside these tests)."""

    opened, commands, recording = [], [], False

    @classmethod
    def hook(cls, event, args):
        if not cls.recording:
            return
        if event == "open" and isinstance(args[0], str):
            cls.opened.append(args[0])
        elif event == "subprocess.Popen":
            cls.commands.append(list(args[1]))


sys.addaudithook(_Audit.hook)


def _mutate(manifest: dict, path: list, action: str, value):
    """``manifest`` with the node at ``path`` replaced by ``value``, deleted, or given an
    extra key."""
    doc = copy.deepcopy(manifest)
    if not path:
        return value
    parent = functools.reduce(lambda node, key: node[key], path[:-1], doc)
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "extra" and isinstance(parent, dict):
        parent[value if isinstance(value, str) else "extra"] = value
    else:
        parent[path[-1]] = value
    return doc


def _paths(node, prefix=()):
    yield list(prefix)
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


def _fill(value, root, canary):
    text = json.dumps(value)
    return json.loads(text.replace(CANARY, json.dumps(str(canary))[1:-1]).replace(
        "{secret}", json.dumps(str(root / "secret.npy"))[1:-1]))


def _attack(root, location, document, canary):
    """Write ``document`` as the set's manifest, open the set at ``location`` and read a
    batch; returns what was opened and run. Only FastMNISTError may escape."""
    (root / "set" / "manifest.json").write_text(json.dumps(document))
    _Audit.opened.clear()
    _Audit.commands.clear()
    tracemalloc.start()
    _Audit.recording = True
    try:
        loader = FastMNISTLoader(location, batch_size=500, normalize=False, prefetch=1)
        len(loader)
        next(iter(loader), None)
    except FastMNISTError:
        pass
    finally:
        _Audit.recording = False
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"allocated {peak} bytes"
    assert not canary.exists(), "a command from the manifest was run"
    inside = str(root / "set") + "/"
    # the set's directory itself is opened too (its files are read through it)
    outside = [p for p in _Audit.opened if p.startswith(str(root)) and not (p + "/").startswith(inside)]
    assert outside == [], f"opened outside the set: {outside}"
    pattern = re.compile(rf"cat {re.escape(inside)}(manifest\.json|(train|test)-\d{{6}}\.tar)")
    for command in _Audit.commands:
        assert command[:2] == ["/bin/sh", "-c"] and pattern.fullmatch(command[2]), command


def _check_many(hostile, location, data, tmp_path):
    root, manifest = hostile
    paths = list(_paths(manifest))
    if data.draw(st.integers(0, 9), label="whole document") == 0:
        document = data.draw(JSON, label="document")
    else:
        path = data.draw(st.sampled_from(paths), label="field")
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "extra"]), label="action")
        document = _mutate(manifest, path, action, data.draw(HOSTILE_VALUES, label="value"))
    canary = tmp_path / "canary"
    _attack(root, location(root), _fill(document, root, canary), canary)


@_fuzz(2000)
@given(data=st.data())
def test_fuzzed_manifests_local(hostile, data, tmp_path):
    _check_many(hostile, lambda root: root / "set", data, tmp_path)


@_fuzz(300)
@given(data=st.data())
def test_fuzzed_manifests_over_http(hostile, server, data, tmp_path):
    _check_many(hostile, lambda root: server, data, tmp_path)


@_fuzz(300)
@given(data=st.data())
def test_fuzzed_manifests_through_pipe(hostile, data, tmp_path):
    _check_many(hostile, lambda root: f"pipe:cat {root}/set/", data, tmp_path)


def _shard_name(manifest, name):
    doc = copy.deepcopy(manifest)
    doc["splits"]["train"]["wds"]["shards"][0]["file"] = name
    return doc


@pytest.mark.parametrize("name", ["train-000000.tar; touch {canary}; echo ", "$(touch {canary})",
                                  "../secret-000000.tar", "{secret}"])
@pytest.mark.parametrize("where", ["local", "http", "pipe"])
def test_hostile_shard_names_are_refused_naming_the_field(hostile, server, tmp_path, name, where):
    root, manifest = hostile
    canary = tmp_path / "canary"
    document = _fill(_shard_name(manifest, name), root, canary)
    location = {"local": root / "set", "http": server, "pipe": f"pipe:cat {root}/set/"}[where]
    (root / "set" / "manifest.json").write_text(json.dumps(document))
    with pytest.raises(FastMNISTError, match=r"manifest.json: splits.train.wds.shards\[0\].file: expected "
                                             r"'train-000000.tar', found"):
        FastMNISTLoader(location, format="wds")
    _attack(root, location, document, canary)
    (root / "set" / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["splits"]["train"].update(count=1004), r"splits.train.files.images_u8.shape: expected "
                                                        r"\[1004, 1, 28, 28\], found \[1003, 1, 28, 28\]"),
    (lambda m: m["splits"]["train"]["files"]["labels"].update(file="/etc/passwd"),
     r"splits.train.files.labels.file: expected 'train_labels.npy', found '/etc/passwd'"),
    (lambda m: m["splits"]["train"]["files"]["labels"].update(size=2**62),
     r"splits.train.files.labels.size: expected 8152 for that shape, found 4611686018427387904"),
    (lambda m: m["splits"]["train"]["wds"]["shards"][1].update(first=0),
     r"splits.train.wds.shards\[1\].first: expected 200, found 0"),
    (lambda m: m["splits"]["train"]["wds"]["shards"].pop(), r"splits.train.wds.shards: 5 shards, but 1003 "
                                                            r"samples in shards of 200 make 6"),
    (lambda m: m["splits"]["train"].update(std=0), r"splits.train.std: expected a number in \[0.0001, 1\]"),
    (lambda m: m["splits"]["train"].update(mean=float("nan")), r"splits.train.mean: expected a number in"),
    (lambda m: m["splits"]["train"].update(count=True), r"splits.train.count: expected an integer, found"),
    (lambda m: m["splits"].update({"../x": {}}), r"splits: name '../x' does not match"),
    (lambda m: m.update(format_version="1"), r"format_version: expected an integer, found str"),
    (lambda m: m.pop("splits"), r"splits: missing"),
])
def test_bad_fields_are_named(hostile, edit, message):
    _, manifest = hostile
    doc = copy.deepcopy(manifest)
    edit(doc)
    with pytest.raises(FastMNISTError, match=f"^m.json: {message}"):
        parse_manifest(json.dumps(doc), "m.json")


def test_valid_manifest_round_trips(hostile):
    _, manifest = hostile
    parsed = parse_manifest(json.dumps(manifest), "m.json")
    assert parsed.splits["train"].count == INDEXED_N and len(parsed.splits["train"].shards) == 6
    assert parsed.splits["train"].formats == ["npy", "wds"]


def test_oversized_and_deeply_nested_manifests(hostile, server):
    root, manifest = hostile
    tracemalloc.start()
    try:
        with pytest.raises(FastMNISTError, match="unreadable manifest: maximum recursion depth"):
            parse_manifest("[" * 100_000 + "]" * 100_000, "m.json")
        (root / "set" / "manifest.json").write_text(" " * (17 << 20) + json.dumps(manifest))
        with pytest.raises(FastMNISTError, match="manifest.json: larger than a manifest may be"):
            FastMNISTLoader(root / "set")
        with pytest.raises(FastMNISTError, match="manifest.json: more than 16777216 bytes"):
            FastMNISTLoader(server)
        assert tracemalloc.get_traced_memory()[1] < 40 << 20
    finally:
        tracemalloc.stop()
        (root / "set" / "manifest.json").write_text(json.dumps(manifest))
    text = json.dumps(manifest)
    try:  # the limit itself: a manifest of exactly 16 MiB opens, one byte more does not
        (root / "set" / "manifest.json").write_text(" " * ((16 << 20) - len(text)) + text)
        assert len(FastMNISTLoader(root / "set", batch_size=INDEXED_N)) == 1
        assert len(FastMNISTLoader(server, batch_size=INDEXED_N)) == 1
        (root / "set" / "manifest.json").write_text(" " * ((16 << 20) + 1 - len(text)) + text)
        with pytest.raises(FastMNISTError, match="manifest.json: larger than a manifest may be"):
            FastMNISTLoader(root / "set")
        with pytest.raises(FastMNISTError, match="manifest.json: more than 16777216 bytes"):
            FastMNISTLoader(server)
    finally:
        (root / "set" / "manifest.json").write_text(text)
