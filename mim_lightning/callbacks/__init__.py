"""Callbacks: checkpointing, seeding and signals, reconstruction images, training monitors, online probes."""

from mim_lightning.callbacks.checkpoint import RunCheckpoint, SeedPerRank, StopOnSignal
from mim_lightning.callbacks.monitor import TrainingMonitor
from mim_lightning.callbacks.probes import KNNProbe, OnlineLinearProbe
from mim_lightning.callbacks.reconstruction import ReconstructionImages

__all__ = ["KNNProbe", "OnlineLinearProbe", "ReconstructionImages", "RunCheckpoint", "SeedPerRank", "StopOnSignal",
           "TrainingMonitor"]
