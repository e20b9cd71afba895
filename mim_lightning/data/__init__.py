"""Data: sources (folder, class folders, demo, Fashion-MNIST, Hugging Face, tar shards), one dataset with
per-sample seeded transforms and masks, samplers, and the DataModules over any source."""

from mim_lightning.data.datamodule import PretrainDataModule
from mim_lightning.data.demo import DemoSource
from mim_lightning.data.shards import ShardSource
from mim_lightning.data.sources import ClassFolderSource, ImageFolderSource, Sample, Source

__all__ = ["ClassFolderSource", "DemoSource", "ImageFolderSource", "PretrainDataModule", "Sample", "ShardSource",
           "Source"]
