"""The parts of ``DataLoader``'s surface that training scripts read besides the batches:
``loader.dataset`` and ``loader.sampler``, with DataLoader's meaning."""

import torch

from ..errors import FastMNISTError


class SplitDataset(torch.utils.data.Dataset):
    """A loader's split as a map-style dataset, as ``torchvision.datasets.MNIST`` with
    ``ToTensor()`` + ``Normalize`` is: ``len()`` is the split's sample count (all ranks
    together, as ``len(DataLoader.dataset)``); ``ds[i]`` is ``(x, label)``, x float32
    ``[1, 28, 28]`` (uint8 with ``normalize=False``) and label an int (int64 ``[8]`` for
    ``qmnist-extended``); ``targets`` the int64 labels ``(N,)`` (``(N, 8)``). Both on the
    CPU, as torchvision's are, whatever the loader's device (a resident split included).
    Indexing needs a local set: streamed shards have no random access."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return self.loader.info.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        n = len(self)
        if not isinstance(index, int) or not -n <= index < n:
            raise IndexError(f"sample index {index!r} out of range for {n} samples")
        source = self._source()
        x, y = source.gather(torch.tensor([index % n], device=source.tensors[0].device))
        x, y, loader = x.cpu(), y.cpu(), self.loader
        if loader.normalize and x.dtype == torch.uint8:
            from ..formats.normalize import normalize_u8

            x = normalize_u8(x, loader.info.mean, loader.info.std)
        return x[0], int(y[0]) if y.dim() == 1 else y[0]  # qmnist-extended: int64 (8,)

    @property
    def targets(self) -> torch.Tensor:
        return self._source().tensors[1].cpu()

    def _source(self):
        source = self.loader.source
        if not source.random_access:
            raise FastMNISTError("the samples of streamed shards cannot be indexed one by one; "
                                 "open a local set (or a local copy) for dataset[i]")
        return source


class EpochSampler:
    """A loader's ``sampler``, as a ``DistributedSampler`` is to a ``DataLoader``:
    ``set_epoch(e)`` chooses the next epoch, ``len()`` is this rank's samples per epoch, and
    iterating gives the sample indices this rank visits in the next epoch. ``plan``: the
    loader's ``EpochPlan``."""

    def __init__(self, plan):
        self.plan = plan

    def set_epoch(self, epoch: int) -> None:
        self.plan.set_epoch(epoch)

    def __len__(self) -> int:
        return self.plan.samples_per_rank

    def __iter__(self):
        return iter(self.plan.rank_order(self.plan.take_over()).tolist())
