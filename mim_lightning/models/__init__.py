"""Plain ``nn.Module`` models (no Lightning): encoders in ``backbones/``, one file per method."""

from mim_lightning.models.output import MIMOutput

__all__ = ["MIMOutput"]
