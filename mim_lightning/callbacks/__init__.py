"""Callbacks: checkpointing, seeding and signals, reconstruction images, training monitors."""

from mim_lightning.callbacks.checkpoint import RunCheckpoint, SeedPerRank, StopOnSignal
from mim_lightning.callbacks.monitor import TrainingMonitor
from mim_lightning.callbacks.reconstruction import ReconstructionImages

__all__ = ["ReconstructionImages", "RunCheckpoint", "SeedPerRank", "StopOnSignal", "TrainingMonitor"]
