"""Run under torchrun by the tests: each rank reads its share with no rank arguments.

    ddp_job.py SET BATCH OUT                  one epoch; rank 0 writes every rank's batches
    ddp_job.py SET BATCH OUT save STATE       4 steps, then rank 0 saves its state_dict
    ddp_job.py SET BATCH OUT resume STATE     load STATE, run the rest of the epoch
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from fastmnist import FastMNISTLoader
from tests.conftest import batch_indices

dist.init_process_group("gloo")
loader = FastMNISTLoader(sys.argv[1], batch_size=int(sys.argv[2]), seed=7, normalize=False)
phase = sys.argv[4] if len(sys.argv) > 4 else "epoch"
if phase == "resume":
    loader.load_state_dict(json.loads(Path(sys.argv[5]).read_text()))
it = iter(loader)
mine = batch_indices([next(it) for _ in range(4)] if phase == "save" else it)
if phase == "save" and dist.get_rank() == 0:
    Path(sys.argv[5]).write_text(json.dumps(loader.state_dict()))
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"rank": loader.rank, "world_size": loader.world_size,
                                  "len": len(loader), "batches": mine})
if dist.get_rank() == 0:
    with open(sys.argv[3], "w") as f:
        json.dump(gathered, f)
dist.destroy_process_group()
