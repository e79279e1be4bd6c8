"""``FastMNISTDataModule``: a converted set as a Lightning ``LightningDataModule`` (the
``lightning`` extra). Its loaders are ``FastMNISTLoader``s, which Lightning checkpoints and
restores through their ``state_dict``/``load_state_dict``: a run resumed from a mid-epoch
checkpoint (``ckpt_path="last"``) continues the epoch exactly, with the same or another
number of processes."""

import lightning

from .errors import FastMNISTError
from .loader import FastMNISTLoader
from .loading.select import holdout
from .store import open_shards


class FastMNISTDataModule(lightning.LightningDataModule):
    """Train batches of ``batch_size`` from the ``train`` split, shuffled by ``seed`` and
    augmented by ``transform`` (a torchvision transform, see ``FastMNISTLoader``; None: not
    augmented); validation batches of ``eval_batch_size`` from ``val_size`` samples held out
    of ``train`` (``fastmnist.holdout``: stratified, by ``seed``; a count, or a fraction;
    5,000 of MNIST's 60,000 as Lightning's own MNIST example holds out), never trained on;
    test batches from the ``test`` split. With ``val_size=None`` there is no hold-out and
    validation reads the test split. Evaluation is in order, un-augmented, and each sample
    exactly once over all processes (``even=False``). ``loader_options`` go to every
    ``FastMNISTLoader`` (``device``, ``images``, ...). Rank and world size come from the
    process group Lightning starts."""

    def __init__(self, path, batch_size: int = 64, eval_batch_size: int = 1000, seed: int = 0,
                 transform=None, val_size: int | float | None = 5000, **loader_options):
        super().__init__()
        self.path, self.batch_size, self.eval_batch_size, self.seed = path, batch_size, eval_batch_size, seed
        self.transform, self.val_size, self.loader_options = transform, val_size, loader_options
        self._parts = None

    def parts(self) -> dict:
        """{"train": indices, "val": indices} of the train split (None without ``val_size``)."""
        if self.val_size is not None and self._parts is None:
            n = open_shards(self.path).split("train").count
            size = self.val_size if isinstance(self.val_size, int) else round(self.val_size * n)
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < n:
                raise FastMNISTError(f"val_size {self.val_size!r}: expected a count in 1..{n - 1} or a "
                                     "fraction of the train split strictly between 0 and 1")
            self._parts = holdout(self.path, {"train": n - size, "val": size}, "train", self.seed)
        return self._parts

    def train_dataloader(self) -> FastMNISTLoader:
        parts = self.parts()
        return FastMNISTLoader(self.path, "train", self.batch_size, shuffle=True, seed=self.seed,
                               transform=self.transform, indices=None if parts is None else parts["train"],
                               **self.loader_options)

    def val_dataloader(self) -> FastMNISTLoader:
        parts = self.parts()
        if parts is None:
            return self._evaluation("test")
        return self._evaluation("train", parts["val"])

    def test_dataloader(self) -> FastMNISTLoader:
        return self._evaluation("test")

    def _evaluation(self, split: str, indices=None) -> FastMNISTLoader:
        return FastMNISTLoader(self.path, split, self.eval_batch_size, shuffle=False, even=False,
                               indices=indices, **self.loader_options)
