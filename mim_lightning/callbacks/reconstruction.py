"""Save reconstruction grids of a fixed set of validation images as PNG files in the run folder."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, default_collate

from mim_lightning.data.datamodule import collate_batch_mask
from mim_lightning.visualize import MIXING_TITLES, RECONSTRUCTION_TITLES, mixing_panels, pair_order, \
    reconstruction_panels, titled_grid


def _indexable(dataset) -> bool:
    return isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__")


def _eval_view(dataset, transform):
    """A shallow copy of a map-style training dataset that applies ``transform`` (the validation
    transform: centre crop, the fixed per-sample mask) instead of the training augmentation."""
    if transform is None or not _indexable(dataset) or not hasattr(dataset, "transform"):
        return None
    view = copy.copy(dataset)
    view.transform = transform
    return view


class ReconstructionImages(Callback):
    """Every ``every_n_steps`` optimizer steps and when training ends, run the model on ``num_images``
    fixed images with their fixed masks and write ``<dirpath>/step_<step>.png``: a title band, then a
    row per image (columns: original, masked, prediction, prediction + visible; for MixMAE, whose
    model sets ``mixes_batch``: original, mixed input, un-mixed reconstruction), each tile upscaled
    (nearest neighbour) to at least ``min_tile`` pixels. The same image goes to TensorBoard, and one
    titled image per sample to Weights & Biases, when those loggers are on.

    The images are the first validation images; when the held-out split has fewer than ``num_images``
    (or none), the rest are the first training images through the validation transform (centre crop,
    fixed mask). :attr:`sources` names them (``"val image 0"``, ``"train image 2"``: the W&B captions).
    Norm-pix predictions arrive already mapped back to pixels with the target patches' statistics
    (``MIMOutput.pred``).
    """

    def __init__(self, dirpath: str, num_images: int = 4, every_n_steps: int = 0, min_tile: int = 128) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = int(num_images)
        self.every_n_steps = int(every_n_steps)
        self.min_tile = int(min_tile)
        self._batch: dict | None = None
        self.sources: list[str] = []
        self.last_path: Path | None = None
        self._saved_step = -1

    def _fixed_batch(self, trainer: pl.Trainer) -> dict | None:
        if self._batch is None:
            datamodule = trainer.datamodule
            val = getattr(datamodule, "val_dataset", None)
            train = getattr(datamodule, "train_dataset", None)
            pools = [("val", val if _indexable(val) else None),
                     ("train", _eval_view(train, getattr(datamodule, "val_transform", None)))]
            items, sources = [], []
            for name, dataset in pools:
                if dataset is None:
                    continue
                # distinct images only (a training set with data.repeat lists each image several times)
                available = len(getattr(dataset, "samples", None) or range(len(dataset)))
                for index in range(min(self.num_images - len(items), available)):
                    items.append(dataset[(index, 0)])
                    sources.append(f"{name} image {index}")
            if not items:
                return None
            per_batch = getattr(getattr(datamodule, "mask_generator", None), "per_batch", False)
            # held-out items carry keys training items lack (``valid``): keep what every item has
            shared = set.intersection(*(set(item) for item in items))
            items = [{k: v for k, v in item.items() if k in shared} for item in items]
            self._batch = (collate_batch_mask if per_batch else default_collate)(items)
            self.sources = sources
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
        if getattr(pl_module.model, "mixes_batch", False):
            panels = mixing_panels(images, output.pred, output.mask, datamodule.mean, datamodule.std)
            titles, sources = MIXING_TITLES, [self.sources[i] for i in pair_order(len(self.sources))]
        else:
            panels = reconstruction_panels(images, output.pred, output.mask, datamodule.mean, datamodule.std)
            titles, sources = RECONSTRUCTION_TITLES, self.sources
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"step_{trainer.global_step:07d}.png"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        grid = titled_grid(panels, titles, self.min_tile)
        Image.fromarray(grid).save(tmp, format="PNG")
        os.replace(tmp, path)
        self.last_path = path
        per_image = [titled_grid(panels[i: i + 1], titles, self.min_tile) for i in range(len(panels))]
        self._log_to_loggers(trainer, grid, per_image, sources)
        return path

    @staticmethod
    def _log_to_loggers(trainer: pl.Trainer, grid, per_image: list, captions: list[str]) -> None:
        """The grid to TensorBoard (one image) and to W&B (one image per sample, captioned)."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("reconstructions", grid, step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key="reconstructions", images=per_image, step=step, caption=captions)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._saved_step:
            self._saved_step = step
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer, pl_module)
