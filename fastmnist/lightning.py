"""``FastMNISTDataModule``: a converted set as a Lightning ``LightningDataModule`` (the
``lightning`` extra). Its loaders are ``FastMNISTLoader``s, which Lightning checkpoints and
restores through their ``state_dict``/``load_state_dict``: a run resumed from a mid-epoch
checkpoint (``ckpt_path="last"``) continues the epoch exactly, with the same or another
number of processes."""

import lightning

from .loader import FastMNISTLoader


class FastMNISTDataModule(lightning.LightningDataModule):
    """Train batches of ``batch_size`` from the ``train`` split, shuffled by ``seed`` and
    augmented by ``transform`` (a torchvision transform, see ``FastMNISTLoader``; None: not
    augmented); validation and test batches of ``eval_batch_size`` from the ``test`` split,
    in order, un-augmented, and each sample exactly once over all processes
    (``even=False``). ``loader_options`` go to every ``FastMNISTLoader`` (``device``,
    ``images``, ...). Rank and world size come from the process group Lightning starts."""

    def __init__(self, path, batch_size: int = 64, eval_batch_size: int = 1000, seed: int = 0,
                 transform=None, **loader_options):
        super().__init__()
        self.path, self.batch_size, self.eval_batch_size, self.seed = path, batch_size, eval_batch_size, seed
        self.transform, self.loader_options = transform, loader_options

    def train_dataloader(self) -> FastMNISTLoader:
        return FastMNISTLoader(self.path, "train", self.batch_size, shuffle=True, seed=self.seed,
                               transform=self.transform, **self.loader_options)

    def val_dataloader(self) -> FastMNISTLoader:
        return self._evaluation()

    def test_dataloader(self) -> FastMNISTLoader:
        return self._evaluation()

    def _evaluation(self) -> FastMNISTLoader:
        return FastMNISTLoader(self.path, "test", self.eval_batch_size, shuffle=False, even=False,
                               **self.loader_options)
