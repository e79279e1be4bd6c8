#!/usr/bin/env bash
# Create .venv (once) and install fastmnist with its benchmark and development extras into
# it, under tools/constraints.txt (the torch/torchvision pair of the project machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c tools/constraints.txt -e '.[dev]' 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "setup: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
