"""LightningModules: pretraining (every method) and finetuning / linear probing."""

from mim_lightning.errors import NonFiniteLossError
from mim_lightning.modules.pretrain import PretrainModule

__all__ = ["NonFiniteLossError", "PretrainModule"]
