"""Callbacks: checkpointing, per-rank seeding, reconstruction images."""

from mim_lightning.callbacks.checkpoint import RunCheckpoint, SeedPerRank
from mim_lightning.callbacks.reconstruction import ReconstructionImages

__all__ = ["ReconstructionImages", "RunCheckpoint", "SeedPerRank"]
