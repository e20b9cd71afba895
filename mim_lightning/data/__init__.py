"""Data: image sources, per-sample seeded transforms with masks, samplers and DataModules."""

from mim_lightning.data.datamodule import PretrainDataModule
from mim_lightning.data.demo import DemoSource
from mim_lightning.data.sources import ClassFolderSource, ImageFolderSource

__all__ = ["ClassFolderSource", "DemoSource", "ImageFolderSource", "PretrainDataModule"]

# Scale-out data sources (data=webdataset, data=hf); `datasets` is imported only when data=hf is used.
from mim_lightning.data.hf import HFDataModule  # noqa: E402
from mim_lightning.data.webdataset import ShardDataModule  # noqa: E402

__all__ += ["HFDataModule", "ShardDataModule"]
