"""The comparison report, same as ``fastmnist bench``:

    python benchmarks/compare.py --shards shards/mnist --raw data
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from fastmnist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
