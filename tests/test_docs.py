"""The documents: the API reference builds from the docstrings with warnings as errors, the
loader's help opens with an example and describes every argument, the README stays short."""

import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from fastmnist import FastMNISTLoader
from fastmnist.formats.idx import read_images, read_labels

from .conftest import write_split

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_with_warnings_as_errors(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "api" / "index.html").read_text()
    assert "FastMNISTLoader" in api and "storage_options" in api


def test_loader_help_opens_with_an_example_and_describes_every_argument():
    doc = inspect.getdoc(FastMNISTLoader)
    head = doc.split("\n\n")
    assert head[1] == "Example::" and "FastMNISTLoader(" in head[2] and "for x, y in loader" in head[2]
    assert len(head[2].splitlines()) == 3
    described = doc.split("Args:")[1]
    for name in inspect.signature(FastMNISTLoader).parameters:
        assert f"\n    {name}: " in described, name


def test_readme_is_short_and_shows_convert_then_load_on_its_first_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:50])
    assert "fastmnist convert" in first_screen and "FastMNISTLoader(" in first_screen


def test_the_readmes_quick_start_runs_as_written(real_root, tmp_path):
    """The Quick start's commands and code, in order, in a fresh directory whose data/ holds
    the real test split's first 8,000 digits as train and the other 2,000 as test."""
    section = (ROOT / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    assert [kind for kind, _ in blocks] == ["bash", "python"]
    raw = real_root / "MNIST" / "raw"
    images = read_images(raw / "t10k-images-idx3-ubyte.gz")[:, 0]
    labels = read_labels(raw / "t10k-labels-idx1-ubyte.gz")
    write_split(tmp_path / "data", "train", images[:8000], labels[:8000])
    write_split(tmp_path / "data", "test", images[8000:], np.asarray(labels[8000:]))
    for line in blocks[0][1].splitlines():
        command = shlex.split(line, comments=True)
        assert command[0] == "fastmnist"
        done = subprocess.run([sys.executable, "-m", "fastmnist.cli", *command[1:]], cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-c", blocks[1][1]], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.splitlines()
    assert [line.split(" accuracy")[0] for line in printed] == ["epoch 0: val", "epoch 1: val", "test"]
    assert all(float(line.rsplit(" ", 1)[1]) > 0.8 for line in printed)  # a linear model, 7,200 digits


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("bash tools/setup.sh && ")
                   and "pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
