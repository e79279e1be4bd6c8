"""Ray Train, as its docs write a ``TorchTrainer`` run, with the loader lines swapped in: the
loader is built inside the training function, where it reads the process group Ray set
up; its ``state_dict`` goes into the checkpoint ``ray.train.report`` saves, and a run
restarted under the same name finds it in ``ray.train.get_checkpoint()``. Starts a local
Ray instance of 2 CPUs. Run by test_trainers (see record.py)."""

import json
import os
import tempfile

import ray
import ray.train
import torch
import torch.nn.functional as F
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

from fastmnist import FastMNISTLoader
from tests.trainers.record import BATCH_SIZE, SEED, Job


def train_func(config: dict) -> None:
    job = Job.from_argv(config["argv"])
    rank = ray.train.get_context().get_world_rank()
    model = prepare_model(torch.nn.Linear(784, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = FastMNISTLoader(job.shards, "train", batch_size=BATCH_SIZE, seed=SEED, normalize=False)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        loader.load_state_dict(json.loads(saved["loader"]))
        step = saved["step"]

    for x, y in loader:
        job.record(step, rank, x)
        loss = F.cross_entropy(model(x.flatten(1).float() / 255), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if job.phase == "stop" and step == job.steps:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:  # every rank's loader state is the same
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "loader": json.dumps(loader.state_dict()), "step": step},
                               os.path.join(d, "state.pt"))
                saved = Checkpoint.from_directory(d) if rank == 0 else None
                ray.train.report({"step": step}, checkpoint=saved)
            return


if __name__ == "__main__":
    job = Job.from_argv()
    ray.init(num_cpus=2, include_dashboard=False)
    trainer = TorchTrainer(train_func, train_loop_config={"argv": [job.shards, str(job.run), job.phase,
                                                                   str(job.steps)]},
                           scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name="run", storage_path=str(job.run / "ray_results")))
    trainer.fit()
