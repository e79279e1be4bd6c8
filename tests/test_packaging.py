"""fastmnist as a library in someone else's stack: importing it and the torch-free commands
load no torch; the loader, convert and verify work with torchvision, webdataset and
matplotlib absent."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "webdataset", "matplotlib", "numba")


def _python(code: str, *args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_import_loads_no_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import fastmnist"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
    assert "fastmnist" in imported
    assert [m for m in imported if m.split(".")[0] in HEAVY] == []


@pytest.mark.parametrize("command", [
    ["--help"], ["synth", "--root", "{tmp}/raw", "--train", "50", "--test", "20"],
    ["convert", "--root", "{tmp}/raw", "--out", "{tmp}/set", "--format", "both"],
    ["info", "{tmp}/set"], ["verify", "{tmp}/set"]])
def test_the_torch_free_commands_import_no_torch(tmp_path_factory, command):
    tmp = tmp_path_factory.getbasetemp() / "torch_free"
    args = [a.replace("{tmp}", str(tmp)) for a in command]
    done = _python("import sys\nfrom fastmnist.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
                   "except SystemExit as e:\n    code = e.code\n"
                   f"print(code, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout[-2000:]  # the command worked, without torch


BLOCKED = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchvision", "webdataset", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
"""

WITHOUT_EXTRAS = BLOCKED + """
from pathlib import Path
from fastmnist import FastMNISTLoader, verify_shards
from fastmnist.cli import main

tmp = Path(sys.argv[1])
assert main(["synth", "--root", str(tmp / "raw"), "--train", "997", "--test", "30"]) == 0
assert main(["convert", "--root", str(tmp / "raw"), "--out", str(tmp / "set"), "--format", "both",
             "--shard-size", "300", "--quiet"]) == 0
assert verify_shards(tmp / "set") == [] and main(["verify", str(tmp / "set")]) == 0
labels = None
for where, kwargs in [(tmp / "set", {}), (tmp / "set", {"format": "wds"}), (f"file://{tmp}/set/", {})]:
    loader = FastMNISTLoader(where, batch_size=100, shuffle=False, **kwargs)
    xs, ys = zip(*loader)
    got = [int(v) for y in ys for v in y]
    assert len(got) == 997 and all(x.dtype.is_floating_point for x in xs)
    labels = labels or got
    assert got == labels
assert main(["bench", "--shards", str(tmp / "set"), "--raw", str(tmp / "raw")]) == 2
print("ok")
"""


def test_loader_convert_and_verify_without_the_extras(tmp_path):
    done = _python(WITHOUT_EXTRAS, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
    assert "the comparison report needs the bench extra (pip install 'fastmnist[bench]')" in done.stderr


def test_the_library_never_imports_the_harness(tmp_path):
    """fastmnist.bench (the benchmark and demo harness) is imported by no library module;
    the command line reaches it only inside the bench, demo and scale commands. A loader
    iterated after `import fastmnist` has loaded none of it."""
    import ast

    package = REPO / "fastmnist"
    for path in package.rglob("*.py"):
        if path.parent.name == "bench":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [f"{'.' * node.level}{node.module or ''}"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any("bench" in n.split(".") for n in names):
                top_level = node in tree.body
                assert path.name == "cli.py" and not top_level, f"{path}:{node.lineno} imports the harness"
    done = _python("import sys\nfrom fastmnist import FastMNISTLoader, convert\n"
                   "from fastmnist.conversion.synth import write_raw\n"
                   "write_raw(sys.argv[1], 100, 10)\n"
                   "convert(sys.argv[1], sys.argv[1] + '/set', progress=False)\n"
                   "sum(len(y) for _, y in FastMNISTLoader(sys.argv[1] + '/set'))\n"
                   "print(sorted(m for m in sys.modules if m.startswith('fastmnist.bench')))",
                   tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]"
