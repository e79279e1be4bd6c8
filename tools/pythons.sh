#!/usr/bin/env bash
# The reused-buffer guarantee (a batch you keep is never written to) and the core loader
# tests on every other Python that pyproject's requires-python admits: 3.10, 3.12, 3.13.
# Each gets a throwaway venv with torch (downloaded from the package index: about 3.5 GB
# with its CUDA libraries; only 3.11's lies on the project machines' disk), deleted after.
# Run by .ci/run after the test command; a missing interpreter fails under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
free_gb=$(df -Pk /tmp | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 12 ]; then  # one venv with torch's CUDA libraries takes about 6 GB
  echo "pythons: SKIPPED: $free_gb GB free in /tmp, 12 needed; the buffer tests ran on this Python only"
  exit 0
fi
TESTS=(tests/test_buffers.py tests/test_loader.py::test_exactly_once_across_ranks_and_workers
       tests/test_loader.py::test_order_is_a_pure_function_of_seed_and_epoch
       tests/test_loader.py::test_resume_with_dataloader_workers tests/test_loader.py::test_pickles_without_data)
for version in 3.10 3.12 3.13; do
  python=""  # pyenv's own, else one on PATH that runs (a pyenv shim may not)
  for candidate in "$HOME"/.pyenv/versions/"$version".*/bin/python "$(command -v "python$version" || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" --version > /dev/null 2>&1; then
      python=$candidate
      break
    fi
  done
  if [ -z "$python" ]; then
    echo "pythons: no Python $version here"
    [ -z "${CI:-}" ] && continue || exit 1
  fi
  venv=$(mktemp -d /tmp/fastmnist-py"$version"-XXXXXX)
  trap 'rm -rf "$venv"' EXIT
  echo "pythons: $($python --version): installing torch, numpy and fastmnist into $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir \
    -c tools/constraints.txt torch torchvision pytest hypothesis . 2>&1 | { grep -v "is ignored" || true; }
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
  rm -rf "$venv"
done
