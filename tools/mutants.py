"""Mutation testing of the core: does some test fail when one operator or constant changes?

    .venv/bin/python tools/mutants.py fastmnist/loading/order.py tests/test_loader.py tests/test_claims.py

Each mutant is one change to one node of the module's syntax tree (an arithmetic or
comparison operator swapped, an integer constant moved by one, ``and``/``or`` swapped, a
boolean constant flipped), written into a copy of the repository; the given tests then run
against the copy (``pytest -x -q -p no:cacheprovider``, stopped at the first failure). A
mutant is killed when they fail, survives when they pass. Prints a line per mutant, then the
score and the survivors (each to be killed by a new test, or explained as equivalent in
docs/reliability.md); ``--only 3,17`` runs those mutants only (the survivors of a run with
quick tests, against slower ones); after ``--``, the tests may carry pytest's own options
(``-- tests/test_hostile.py -k "not stress"``). A mutant the tests hang on (past ``--timeout``) counts as
killed. The tests run with ``CI=true`` and the real digits of
``../shared/data/mnist-t10k`` (or ``FASTMNIST_REAL_DATA``), as the README's test command runs them.
"""

import argparse
import ast
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "mnist-t10k"
SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult,
         ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
         ast.NotEq: ast.Eq, ast.And: ast.Or, ast.Or: ast.And, ast.Mod: ast.FloorDiv}


def mutants(source: str):
    """(line, description, mutated source) for every mutation point of ``source``."""
    tree = ast.parse(source)
    points = [node for node in ast.walk(tree) if _mutable(node)]
    for k in range(len(points)):
        copy = ast.parse(source)
        node = [n for n in ast.walk(copy) if _mutable(n)][k]
        description = _mutate(node)
        yield node.lineno, description, ast.unparse(copy)


def _mutable(node) -> bool:
    if isinstance(node, (ast.BinOp, ast.BoolOp)):
        return type(node.op) in SWAPS
    if isinstance(node, ast.Compare):
        return type(node.ops[0]) in SWAPS
    return isinstance(node, ast.Constant) and type(node.value) in (int, bool)


def _mutate(node) -> str:
    if isinstance(node, (ast.BinOp, ast.BoolOp)):
        old = type(node.op)
        node.op = SWAPS[old]()
        return f"{old.__name__} -> {SWAPS[old].__name__}"
    if isinstance(node, ast.Compare):
        old = type(node.ops[0])
        node.ops[0] = SWAPS[old]()
        return f"{old.__name__} -> {SWAPS[old].__name__}"
    old = node.value
    node.value = (not old) if isinstance(old, bool) else old + 1
    return f"{old!r} -> {node.value!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the module to mutate, relative to the repository")
    parser.add_argument("tests", nargs="+", help="the tests that cover it (after `--`, with pytest's own "
                                                 "options: -- tests/a.py -k 'not slow')")
    parser.add_argument("--only", help="comma-separated mutant numbers or ranges, 3,17,40-60 (those "
                                       "another run's tests let survive, say): run these only")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds the tests may run on a mutant before it counts as killed (600)")
    args = parser.parse_args()
    original = (REPO / args.module).read_text()
    found = list(enumerate(mutants(original), 1))
    if args.only:
        wanted = set()
        for part in args.only.split(","):
            first, _, last = part.partition("-")
            wanted.update(range(int(first), int(last or first) + 1))
        found = [(n, m) for n, m in found if n in wanted]
    survivors, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        skipped = shutil.ignore_patterns(".venv", ".git", "data", "shards", "results", "*.egg-info",
                                         "__pycache__")
        shutil.copytree(REPO, copy, ignore=skipped)
        # the copy is not beside ../shared: point the tests at the real digits, and make them
        # fail rather than skip without them (a skipped comparison would let mutants live)
        environment = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin", "HOME": tmp, "CI": "true",
                       "FASTMNIST_REAL_DATA": os.environ.get("FASTMNIST_REAL_DATA", str(REAL_DATA))}
        for number, (line, description, mutated) in found:
            (copy / args.module).write_text(mutated)
            failed = _run_tests(args.tests, copy, environment, args.timeout)  # None: they hang on it
            if failed is False:
                survivors.append((number, line, description))
            outcome = {True: "killed", False: "SURVIVED",
                       None: f"killed (the tests ran past {args.timeout:.0f} s)"}
            print(f"[{number}] line {line}: {description}: {outcome[failed]}", flush=True)
        (copy / args.module).write_text(original)
    killed = len(found) - len(survivors)
    print(f"\n{args.module}: {killed} of {len(found)} mutants killed ({killed / max(1, len(found)):.0%}) "
          f"in {time.perf_counter() - start:.0f} s")
    for number, line, description in survivors:
        print(f"  survived: [{number}] line {line}: {description}")
    if survivors:
        print(f"  (--only {','.join(str(n) for n, _, _ in survivors)} runs these again)")
    return 0


def _run_tests(tests: list, copy: Path, environment: dict, timeout: float) -> bool | None:
    """Whether pytest fails ``tests`` in ``copy``; None when it runs past ``timeout`` seconds
    (then it and every process it started, DataLoader workers included, are killed)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    with subprocess.Popen(command, cwd=copy, env=environment, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True) as run:
        try:
            return run.wait(timeout=timeout) != 0
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            return None


if __name__ == "__main__":
    sys.exit(main())
