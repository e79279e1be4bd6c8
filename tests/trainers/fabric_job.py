"""Lightning Fabric, as its docs write a training loop, with the loader lines swapped in:
``fabric.setup_dataloaders(loader.as_dataloader())``, and the loader itself in the state
that ``fabric.save``/``fabric.load`` checkpoint. Run by test_trainers (see record.py)."""

import lightning as L
import torch
import torch.nn.functional as F

from fastmnist import FastMNISTLoader
from tests.trainers.record import BATCH_SIZE, SEED, Job

job = Job.from_argv()
fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()

model = torch.nn.Linear(784, 10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
model, optimizer = fabric.setup(model, optimizer)
loader = FastMNISTLoader(job.shards, "train", batch_size=BATCH_SIZE, seed=SEED, normalize=False)
train_dataloader = fabric.setup_dataloaders(loader.as_dataloader())

state = {"model": model, "optimizer": optimizer, "loader": loader, "step": 0}
if job.phase == "resume":
    fabric.load(job.run / "checkpoint.ckpt", state)

for x, y in train_dataloader:
    job.record(state["step"], fabric.global_rank, x)
    loss = F.cross_entropy(model(x.flatten(1).float() / 255), y)
    optimizer.zero_grad()
    fabric.backward(loss)
    optimizer.step()
    state["step"] += 1
    if job.phase == "stop" and state["step"] == job.steps:
        fabric.save(job.run / "checkpoint.ckpt", state)
        break
del model, optimizer, state  # the DDP wrapper holds the group: destroyed here, not at the exit
torch.distributed.destroy_process_group()  # a gloo group left to the interpreter's exit can abort it
