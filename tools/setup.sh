#!/usr/bin/env bash
# Create .venv (once) and install fastmnist with its development tools into it.
# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml: on the project machines
# pip takes that pair from local disk (Python 3.11); elsewhere it comes from the index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "setup: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
