"""PyTorch Ignite, as its docs write a distributed run, with the loader lines swapped in:
``idist.Parallel`` with gloo starts 2 processes, ``Engine.run(loader)`` takes the loader as
it is (``idist.auto_dataloader`` is for map-style datasets), and a ``Checkpoint`` of the
trainer, model, optimizer and loader resumes mid-epoch. Run by test_trainers (see record.py)."""

import gc
import sys

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from fastmnist import FastMNISTLoader
from tests.trainers.record import BATCH_SIZE, SEED, Job


def training(local_rank: int, argv: list[str]) -> None:
    train(argv)
    # the checkpoint handler makes a reference cycle through the DDP model, which holds the gloo
    # group: collected here, before idist destroys the group, not at the interpreter's exit
    gc.collect()


def train(argv: list[str]) -> None:
    job = Job.from_argv(argv)
    model = idist.auto_model(torch.nn.Linear(784, 10))
    optimizer = idist.auto_optim(torch.optim.SGD(model.parameters(), lr=0.01))
    loader = FastMNISTLoader(job.shards, "train", batch_size=BATCH_SIZE, seed=SEED, normalize=False)

    def train_step(engine, batch):
        x, y = batch
        job.record(engine.state.iteration - 1, idist.get_rank(), x)
        loss = F.cross_entropy(model(x.flatten(1).float() / 255), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(train_step)
    to_save = {"trainer": trainer, "model": model, "optimizer": optimizer, "loader": loader}
    if job.phase == "stop":
        checkpoint = Checkpoint(to_save, DiskSaver(job.run / "checkpoints", require_empty=False))
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=job.steps), checkpoint)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=job.steps), lambda e: e.terminate())
    if job.phase == "resume":
        saved = next((job.run / "checkpoints").glob("checkpoint_*.pt"))
        Checkpoint.load_objects(to_save, torch.load(saved, weights_only=False))
    trainer.run(loader, max_epochs=1)


if __name__ == "__main__":
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(training, sys.argv[1:])
