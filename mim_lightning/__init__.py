"""mim_lightning: masked image modeling (MAE, SimMIM, MixMAE, iTPN) on Lightning and Hydra."""

from mim_lightning.api import (
    build_datamodule,
    build_finetune_datamodule,
    build_finetune_module,
    build_mask_generator,
    build_pretrain_module,
    build_trainer,
    finetune,
    pretrain,
)
from mim_lightning.config import compose
from mim_lightning.errors import ConfigError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "build_datamodule",
    "build_finetune_datamodule",
    "build_finetune_module",
    "build_mask_generator",
    "build_pretrain_module",
    "build_trainer",
    "compose",
    "finetune",
    "pretrain",
]
