"""LightningModules: the shared pretraining module (and, later, finetuning)."""

from mim_lightning.methods.pretrain import NonFiniteLossError, PretrainModule

__all__ = ["NonFiniteLossError", "PretrainModule"]
