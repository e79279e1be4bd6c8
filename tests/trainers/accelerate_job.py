"""Hugging Face Accelerate, as its docs write a training loop, with the loader lines swapped
in: ``accelerator.prepare`` hands the loader back unchanged (its split is by rank already),
and ``register_for_checkpointing(loader)`` puts it in ``save_state``/``load_state``. Launched
by test_trainers with ``accelerate launch --multi_gpu --num_processes 2`` (see record.py);
``refuse`` instead prepares ``loader.as_dataloader()``, which must be refused."""

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from fastmnist import FastMNISTError, FastMNISTLoader
from tests.trainers.record import BATCH_SIZE, SEED, Job

job = Job.from_argv()
if job.phase == "refuse":
    accelerator = Accelerator(cpu=True)
    loader = FastMNISTLoader(job.shards, "train", batch_size=BATCH_SIZE, seed=SEED, normalize=False)
    try:
        next(iter(accelerator.prepare(loader.as_dataloader())))
    except FastMNISTError as e:
        (job.run / f"refused.rank{accelerator.process_index}.txt").write_text(str(e))
        accelerator.end_training()
        raise SystemExit(0) from None
    raise SystemExit(f"rank {accelerator.process_index}: not refused")

accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(784, 10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
loader = FastMNISTLoader(job.shards, "train", batch_size=BATCH_SIZE, seed=SEED, normalize=False)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
accelerator.register_for_checkpointing(loader)
step = 0
if job.phase == "resume":
    accelerator.load_state(job.run / "checkpoint")
    step = job.steps

for x, y in loader:
    job.record(step, accelerator.process_index, x)
    loss = F.cross_entropy(model(x.flatten(1).float() / 255), y)
    optimizer.zero_grad()
    accelerator.backward(loss)
    optimizer.step()
    step += 1
    if job.phase == "stop" and step == job.steps:
        accelerator.save_state(job.run / "checkpoint")
        break
# the DDP wrapper holds the gloo group: released first, destroy_process_group ends the group here,
# not during the interpreter's exit, where gloo can abort the process
model, optimizer = accelerator.free_memory(model, optimizer)
accelerator.end_training()
