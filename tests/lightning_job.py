"""A Lightning training run over FastMNISTDataModule, for test_lightning: the model records
the sample indices of every training step (one JSON line per step and rank, flushed).

    lightning_job.py SET RUN_DIR DEVICES [resume]
"""

import json
import os
import sys
import time
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from fastmnist.lightning import FastMNISTDataModule
from tests.conftest import decode_indices

VAL_SIZE = 100  # held out of the 1,003 train samples, never trained on


class Recorder(lightning.LightningModule):
    def __init__(self, log: Path):
        super().__init__()
        self.layer = torch.nn.Linear(784, 10)
        self.log_path = log

    def training_step(self, batch, batch_idx):
        time.sleep(0.02)  # so that the test's kill lands mid-epoch, a step or two after it aims
        x, y = batch
        with open(self.log_path.with_suffix(f".rank{self.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": self.global_step, "rank": self.global_rank,
                                "indices": decode_indices(x)}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return F.cross_entropy(self.layer(x.flatten(1).float() / 255), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    shards, run, devices = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    resume = len(sys.argv) > 4
    trainer = lightning.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
        default_root_dir=run, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[ModelCheckpoint(dirpath=run / "checkpoints", every_n_train_steps=5,
                                                           save_top_k=-1, save_last=True)])
    data = FastMNISTDataModule(shards, batch_size=20, seed=3, normalize=False, val_size=VAL_SIZE)
    trainer.fit(Recorder(run / ("resumed" if resume else "first")), datamodule=data,
                ckpt_path="last" if resume else None)
    if torch.distributed.is_initialized():  # a clean exit: gloo's threads can abort at teardown
        torch.distributed.destroy_process_group()
