"""Save reconstruction grids of a fixed set of validation images as PNG files in the run folder."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch.utils.data import default_collate

from mim_lightning.data.datamodule import collate_batch_mask
from mim_lightning.visualize import mixing_panels, panels_to_grid, reconstruction_panels


class ReconstructionImages(Callback):
    """Every ``every_n_steps`` optimizer steps and when training ends, run the model on the first
    ``num_images`` validation images with their fixed masks and write
    ``<dirpath>/step_<step>.png`` (rows: images; columns: original, masked, prediction, pasted; for
    MixMAE, whose model sets ``mixes_batch``: original, mixed input, un-mixed reconstruction), and
    log it to TensorBoard and Weights & Biases when those loggers are on. Norm-pix predictions arrive
    already mapped back to pixels with the target patches' statistics (``MIMOutput.pred``).
    """

    def __init__(self, dirpath: str, num_images: int = 4, every_n_steps: int = 0) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = int(num_images)
        self.every_n_steps = int(every_n_steps)
        self._batch: dict | None = None
        self.last_path: Path | None = None
        self._saved_step = -1

    def _fixed_batch(self, trainer: pl.Trainer) -> dict | None:
        if self._batch is None:
            datamodule = trainer.datamodule
            dataset = getattr(datamodule, "val_dataset", None) or getattr(datamodule, "train_dataset", None)
            if dataset is None:
                return None
            count = min(self.num_images, len(dataset))
            per_batch = getattr(getattr(datamodule, "mask_generator", None), "per_batch", False)
            collate = collate_batch_mask if per_batch else default_collate
            self._batch = collate([dataset[(i, 0)] for i in range(count)])
        return self._batch

    @rank_zero_only
    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        batch = self._fixed_batch(trainer)
        if batch is None or self.num_images <= 0:
            return None
        images = batch["images"].to(pl_module.device)
        mask = batch.get("mask")
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            output = pl_module.model(images, mask=None if mask is None else mask.to(pl_module.device))
        pl_module.train(was_training)
        datamodule = trainer.datamodule
        view = mixing_panels if getattr(pl_module.model, "mixes_batch", False) else reconstruction_panels
        panels = view(images, output.pred, output.mask, datamodule.mean, datamodule.std)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"step_{trainer.global_step:07d}.png"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        grid = panels_to_grid(panels)
        Image.fromarray(grid).save(tmp, format="PNG")
        os.replace(tmp, path)
        self.last_path = path
        self._log_to_loggers(trainer, grid, [panels_to_grid(panels[i: i + 1]) for i in range(len(panels))])
        return path

    @staticmethod
    def _log_to_loggers(trainer: pl.Trainer, grid, per_image: list) -> None:
        """The grid to TensorBoard (one image) and to W&B (one image per sample, captioned)."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("reconstructions", grid, step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                captions = [f"val image {i}" for i in range(len(per_image))]
                logger.log_image(key="reconstructions", images=per_image, step=step, caption=captions)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._saved_step:
            self._saved_step = step
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer, pl_module)
