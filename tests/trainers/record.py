"""What the trainer jobs share: their command line and the record of what each rank saw.

    <job>.py SET RUN_DIR epoch        one uninterrupted epoch
    <job>.py SET RUN_DIR stop K       K steps, then a checkpoint through the trainer, then exit
    <job>.py SET RUN_DIR resume K     from that checkpoint, the rest of the epoch

Every training step appends ``{"phase", "step", "rank", "indices"}`` to
``RUN_DIR/<phase>.rank<R>.jsonl``: the sample indices of its batch (the indexed set's
images encode them).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import decode_indices

BATCH_SIZE, SEED = 20, 3


@dataclass(frozen=True)
class Job:
    shards: str
    run: Path
    phase: str  # "epoch", "stop" or "resume"
    steps: int  # stop: after this many steps; resume: the steps already done

    @classmethod
    def from_argv(cls, argv=None) -> "Job":
        argv = sys.argv[1:] if argv is None else argv
        return cls(argv[0], Path(argv[1]), argv[2], int(argv[3]) if len(argv) > 3 else 0)

    def record(self, step: int, rank: int, x) -> None:
        with open(self.run / f"{self.phase}.rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"phase": self.phase, "step": step, "rank": rank,
                                "indices": decode_indices(x.cpu())}) + "\n")
