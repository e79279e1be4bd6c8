"""Run under torchrun by test_loader: each rank reads its share with no rank arguments."""

import json
import sys

import torch.distributed as dist

from fastmnist import FastMNISTLoader
from tests.conftest import decode_indices

dist.init_process_group("gloo")
loader = FastMNISTLoader(sys.argv[1], batch_size=int(sys.argv[2]), seed=7, normalize=False)
mine = [decode_indices(x) for x, _ in loader]
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"rank": loader.rank, "world_size": loader.world_size,
                                  "len": len(loader), "batches": mine})
if dist.get_rank() == 0:
    with open(sys.argv[3], "w") as f:
        json.dump(gathered, f)
dist.destroy_process_group()
