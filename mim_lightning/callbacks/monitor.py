"""Scalars that tell whether a run is healthy: throughput and the mask actually applied."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from mim_lightning.mask_stats import mask_statistics
from mim_lightning.masking import MaskGenerator


class TrainingMonitor(Callback):
    """Logs ``perf/images_per_sec`` (all devices, wall clock over the last ``window`` batches) and
    ``mask/ratio`` (hidden fraction of the masks in the batch) every step, and once at the start the
    mask generator's ``mask/config_ratio`` (``mask.ratio`` as configured), ``mask/applied_ratio`` (the
    fraction its masks actually hide: SimMIM's ``ceil(0.6 * 4)`` of 4 units at 64px is 0.75) and
    ``mask/avg_dist`` (SimMIM's AvgDist, pixels). The generator is the data's, else the model's own
    (``model.mask_generator``: the method's default rule with ``mask=null``).
    """

    def __init__(self, window: int = 20, mask_samples: int = 64) -> None:
        self.window = max(1, int(window))
        self.mask_samples = int(mask_samples)
        self._times: list[float] = []
        self._images = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        generator = getattr(trainer.datamodule, "mask_generator", None) if trainer.datamodule is not None else None
        if generator is None:
            generator = getattr(getattr(pl_module, "model", None), "mask_generator", None)
        if not isinstance(generator, MaskGenerator) or not trainer.loggers:
            return
        metrics = mask_statistics(generator, samples=self.mask_samples)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._times.append(time.perf_counter())
        self._times = self._times[-(self.window + 1):]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images = batch["images"].shape[0] * trainer.world_size
        if len(self._times) > 1:
            elapsed = self._times[-1] - self._times[0]
            # A host tensor: Lightning turns a Python float into a device tensor with a blocking copy.
            pl_module.log("perf/images_per_sec", torch.tensor(images * (len(self._times) - 1) / max(elapsed, 1e-9)))
        mask = batch.get("mask")
        if mask is not None:
            pl_module.log("mask/ratio", mask.float().mean(), batch_size=batch["images"].shape[0])

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._times = []  # do not count validation and checkpointing between epochs
