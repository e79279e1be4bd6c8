#!/usr/bin/env bash
# Create .venv (once) and install fastmnist with its benchmark and development extras into
# it, under tools/constraints.txt (the torch/torchvision pair of the project machines).
# Prints one line per step, and pip's own lines (what it collects and installs) as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ -x .venv/bin/python ]; then
  echo "setup [1/3]: .venv exists ($(.venv/bin/python --version))"
else
  echo "setup [1/3]: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
echo "setup [2/3]: installing fastmnist[dev] and its dependencies (a fresh .venv takes 2-4 minutes:" \
     "torch and torchvision are 5 GB unpacked)"
.venv/bin/python -m pip install --disable-pip-version-check --progress-bar on -c tools/constraints.txt \
  -e '.[dev]' 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" \
  -e "^Requirement already satisfied" || true; }
# Flower Datasets, the reference the federated partitions are tested against: without its
# dependencies, which pin datasets<5 and fsspec<=2026.2 against s3fs's fsspec (its
# partitioners need only what is installed; seaborn is imported by its plots).
.venv/bin/python -m pip install --disable-pip-version-check -q --no-deps flwr-datasets==0.6.1 seaborn==0.13.2 \
  2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
echo "setup [3/3]: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)') ready"
