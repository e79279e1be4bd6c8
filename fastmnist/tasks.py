"""Continual-learning task streams over one converted split: SplitMNIST (class groups),
PermutedMNIST (a fixed pixel permutation per task) and RotatedMNIST (a fixed angle per task).

A stream is a sequence of loaders, one per task, each a ``FastMNISTLoader`` (a subset of
classes, or a fixed keyed transform of every sample), so every task keeps the loader's
exact, resumable epochs. The stream's ``state_dict`` is the task in progress and its
loader's state: a run stopped anywhere, inside a task or between two, continues exactly.
"""

import hashlib
import json

import numpy as np
import torch

from .errors import FastMNISTError
from .loader import FastMNISTLoader

PIXELS = 28 * 28
STATE_VERSION = 1


class TaskLoader(FastMNISTLoader):
    """A ``FastMNISTLoader`` for task ``task`` of a stream: its batches' pixels reordered by
    ``permutation`` (int64 ``(784,)``: flattened output pixel ``j`` is input pixel
    ``permutation[j]``) when given, and with ``task_ids`` a third item, int64 ``[B]`` filled
    with ``task``."""

    def __init__(self, *args, task: int, permutation: torch.Tensor | None = None, task_ids: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.task, self.task_ids = task, task_ids
        self.permutation = None if permutation is None else permutation.to(self.device)

    def __iter__(self):
        for x, y in super().__iter__():
            if self.permutation is not None:
                x = x.flatten(1).index_select(1, self.permutation).view_as(x)
            yield (x, y, torch.full((len(y),), self.task, dtype=torch.int64, device=y.device)) \
                if self.task_ids else (x, y)


class TaskStream:
    """Tasks ``0..len(stream)-1``, a loader each (made when first asked for)::

        stream = fastmnist.permuted_tasks("shards/mnist", num_tasks=10, batch_size=128)
        for task, loader in stream:          # from the task a loaded state is in
            while loader.epoch < epochs:     # resumes inside the task's epochs too
                for x, y in loader:
                    ...
            # checkpoint: {"stream": stream.state_dict(), ...}

    ``stream.loader(t)`` gives task ``t``'s loader directly."""

    def __init__(self, kind: str, params: dict, num_tasks: int, make):
        self.kind, self.params, self._make = kind, params, make
        self.task, self._loaders = 0, [None] * num_tasks
        self.digest = hashlib.sha256(json.dumps([kind, params], sort_keys=True).encode()).hexdigest()[:32]

    def __len__(self) -> int:
        return len(self._loaders)

    def loader(self, task: int) -> TaskLoader:
        if not isinstance(task, int) or isinstance(task, bool) or not 0 <= task < len(self):
            raise FastMNISTError(f"task must be an integer in 0..{len(self) - 1}, got {task!r}")
        if self._loaders[task] is None:
            self._loaders[task] = self._make(task)
        return self._loaders[task]

    def __iter__(self):
        while self.task < len(self):
            yield self.task, self.loader(self.task)
            self.task += 1

    def state_dict(self) -> dict:
        """The task in progress and its loader's state (JSON-serialisable)."""
        task = min(self.task, len(self) - 1)
        return {"version": STATE_VERSION, "stream": self.digest, "task": self.task,
                "loader": self.loader(task).state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (of a stream made with the same arguments): its task, then
        the rest of that task's epoch and epochs."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise FastMNISTError(f"not a fastmnist task stream state (version {STATE_VERSION})")
        if state.get("stream") != self.digest:
            theirs = str(state.get("stream"))[:40]
            raise FastMNISTError(f"this state is of another task stream (stream {theirs!r}, this one "
                                 f"{self.digest!r}: {self.kind} {json.dumps(self.params)[:200]})")
        task = state.get("task")
        if not isinstance(task, int) or isinstance(task, bool) or not 0 <= task <= len(self):
            raise FastMNISTError(f"state's task must be an integer in 0..{len(self)}, got {task!r}")
        self.loader(min(task, len(self) - 1)).load_state_dict(state.get("loader"))
        self.task = task


def split_tasks(path, groups, split: str = "train", seed: int = 0, task_ids: bool = False,
                **loader_args) -> TaskStream:
    """SplitMNIST: task ``t`` visits the samples of the classes ``groups[t]`` (disjoint
    groups of class labels, e.g. ``[[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]``), labels as
    stored (class-incremental; ``task_ids=True`` adds the task to each batch for the
    task-incremental setting)."""
    from .store import open_shards

    info = open_shards(path).split(split).info
    groups = _groups(groups, info.num_classes)
    params = {"split": split, "groups": groups, "seed": seed}

    def make(t: int) -> TaskLoader:
        return TaskLoader(path, split, task=t, task_ids=task_ids, classes=groups[t], seed=_task_seed(seed, t),
                          **loader_args)

    return TaskStream("split", params, len(groups), make)


def permuted_tasks(path, num_tasks: int, split: str = "train", seed: int = 0, permutation_seed: int = 0,
                   task_ids: bool = False, **loader_args) -> TaskStream:
    """PermutedMNIST: task ``t`` is the whole split with the pixels of every image reordered
    by ``task_permutation(permutation_seed, t)`` (task 0 unpermuted), after normalisation."""
    _positive(num_tasks, "num_tasks")
    params = {"split": split, "num_tasks": num_tasks, "seed": seed, "permutation_seed": permutation_seed}

    def make(t: int) -> TaskLoader:
        return TaskLoader(path, split, task=t, task_ids=task_ids, seed=_task_seed(seed, t),
                          permutation=task_permutation(permutation_seed, t), **loader_args)

    return TaskStream("permuted", params, num_tasks, make)


def rotated_tasks(path, angles, split: str = "train", seed: int = 0, task_ids: bool = False,
                  **loader_args) -> TaskStream:
    """RotatedMNIST: task ``t`` is the whole split rotated by ``angles[t]`` degrees
    (counter-clockwise), as torchvision's ``rotate`` (nearest, fill 0) gives it, then
    normalised: the augmentation path with ``RandomRotation((a, a))``."""
    from torchvision import transforms

    from .store import open_shards

    if "transform" in loader_args:
        raise FastMNISTError("rotated_tasks makes each task's transform itself (its rotation); "
                             "transform= cannot be given")
    try:
        angles = [float(a) for a in angles]
    except (TypeError, ValueError):
        raise FastMNISTError(f"angles: expected a sequence of numbers, got {angles!r}"[:200]) from None
    if not angles or not all(np.isfinite(angles)):
        raise FastMNISTError(f"angles: expected finite angles in degrees, one per task, got {angles!r}"[:200])
    info = open_shards(path).split(split).info
    params = {"split": split, "angles": angles, "seed": seed}

    def make(t: int) -> TaskLoader:
        rotate = transforms.Compose([transforms.RandomRotation((angles[t], angles[t])), transforms.ToTensor(),
                                     transforms.Normalize((info.mean,), (info.std,))])
        return TaskLoader(path, split, task=t, task_ids=task_ids, transform=rotate, seed=_task_seed(seed, t),
                          **loader_args)

    return TaskStream("rotated", params, len(angles), make)


def task_permutation(permutation_seed: int, task: int) -> torch.Tensor:
    """int64 ``(784,)``: task ``task``'s pixel permutation, a pure function of
    ``(permutation_seed, task)``; the identity for task 0 (the original digits are task 0,
    as in van de Ven et al.'s PermutedMNIST)."""
    if task == 0:
        return torch.arange(PIXELS)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([permutation_seed, task, 9])))
    return torch.from_numpy(rng.permutation(PIXELS))


def _task_seed(seed: int, task: int) -> int:
    """The loader seed of task ``task``: each task shuffled on its own stream."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise FastMNISTError(f"seed must be a non-negative integer, got {seed!r}")
    return int(np.random.SeedSequence([seed, task, 10]).generate_state(1)[0])


def _groups(groups, num_classes: int) -> list[list[int]]:
    try:
        groups = [[int(c) for c in g] for g in groups]
    except (TypeError, ValueError):
        raise FastMNISTError(f"groups: expected lists of class labels, got {groups!r}"[:200]) from None
    seen = {}
    for t, group in enumerate(groups):
        if not group:
            raise FastMNISTError(f"groups: task {t} has no class")
        for c in group:
            if not 0 <= c < num_classes:
                raise FastMNISTError(f"groups: class {c} (task {t}) is not a class of this set "
                                     f"(0..{num_classes - 1})")
            if c in seen:
                raise FastMNISTError(f"groups: class {c} is in task {seen[c]} and task {t}; tasks' classes "
                                     "must not overlap")
            seen[c] = t
    if not groups:
        raise FastMNISTError("groups: no task")
    return groups


def _positive(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FastMNISTError(f"{name} must be a positive integer, got {value!r}")

