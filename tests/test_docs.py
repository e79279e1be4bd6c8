"""The documents: the API reference builds from the docstrings with warnings as errors, the
loader's help opens with an example and describes every argument, the README stays short."""

import inspect
import subprocess
import sys
from pathlib import Path

from fastmnist import FastMNISTLoader

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
