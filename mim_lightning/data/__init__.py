"""Data: image sources, per-sample seeded transforms with masks, samplers and DataModules."""

from mim_lightning.data.datamodule import PretrainDataModule
from mim_lightning.data.demo import DemoSource
from mim_lightning.data.sources import ClassFolderSource, ImageFolderSource

__all__ = ["ClassFolderSource", "DemoSource", "ImageFolderSource", "PretrainDataModule"]
