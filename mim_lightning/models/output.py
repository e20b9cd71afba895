"""What every pretraining model returns (DESIGN.md §3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MIMOutput:
    """The result of ``model(images, mask)``.

    Attributes:
        loss: scalar training loss.
        pred: (B, 3, H, W) reconstruction in the input's normalized pixel space; norm-pix predictions
            are mapped back with the target patches' statistics.
        mask: the mask used, bool, True = hidden, on the method's mask grid.
        latent: the encoder's output tokens, when the method has a single token sequence.
        losses: the named terms that make up ``loss`` (for logging), empty when there is one term.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    latent: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
