"""LightningModules: the shared pretraining module (and, later, finetuning)."""

from mim_lightning.modules.pretrain import NonFiniteLossError, PretrainModule

__all__ = ["NonFiniteLossError", "PretrainModule"]
