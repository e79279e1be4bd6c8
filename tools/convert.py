"""Convert torchvision MNIST raw files into fastmnist shards (same as ``fastmnist convert``).

    python tools/convert.py --root data --out shards/mnist
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from fastmnist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
