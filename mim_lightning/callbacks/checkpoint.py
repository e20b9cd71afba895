"""Checkpointing and seeding callbacks for every run."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends.

    With ``every_n_train_steps`` Lightning saves only on those steps, so a short run (or the steps
    after the last multiple of N) would end with no checkpoint of its final weights.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class SeedPerRank(Callback):
    """Re-seed torch/numpy/python with ``seed + global_rank`` once ranks are known, so on-device
    random draws (e.g. masks a model makes itself) differ between ranks but are reproducible."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)
