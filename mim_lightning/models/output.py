"""What every pretraining model returns: ``model(images, mask=None) -> MIMOutput``, the one contract that the
pretraining module, the callbacks and the scripts rely on (``mask`` a bool grid, True = hidden)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DisplaySource(Protocol):
    """Something that makes the display image on demand: ``render() -> (B, C, H, W)`` float tensor."""

    def render(self) -> torch.Tensor: ...


@dataclass
class PatchPixels:
    """Per-patch predictions and what turns them into the display image: ``render()`` maps norm-pix
    predictions back with the target patches' ``mean``/``var`` (when given) and un-patchifies to
    (B, C, H, W) float. Held by :class:`MIMOutput` so that a training step that only needs the loss
    never pays for it (issue #19)."""

    patches: torch.Tensor
    patch_size: int
    grid: tuple[int, int]
    channels: int = 3
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None

    def render(self) -> torch.Tensor:
        from mim_lightning.losses import denormalize_patches, unpatchify

        pixels = self.patches.float()
        if self.mean is not None:
            pixels = denormalize_patches(pixels, self.mean, self.var)
        return unpatchify(pixels, self.patch_size, self.grid, self.channels)


@dataclass(init=False)
class MIMOutput:
    """The result of ``model(images, mask)``.

    Attributes:
        loss: scalar training loss.
        pred: (B, 3, H, W) float reconstruction in the input's normalized pixel space; norm-pix predictions
            are mapped back with the target patches' statistics. Made on first access (and kept): the
            training step reads only ``loss``, so it never un-normalises or un-patchifies anything.
        mask: the mask used, bool, True = hidden, on the method's mask grid.
        latent: the encoder's output tokens, when the method has a single token sequence.
        losses: the named terms that make up ``loss`` (for logging), empty when there is one term.

    ``pred`` may be given as a tensor (returned as float) or as a :class:`DisplaySource` (such as
    :class:`PatchPixels`) that is rendered when ``pred`` is first read.
    """

    loss: torch.Tensor
    mask: torch.Tensor
    latent: torch.Tensor | None
    losses: dict[str, torch.Tensor]
    pred_source: torch.Tensor | DisplaySource | None = field(repr=False)

    def __init__(self, loss: torch.Tensor, pred: torch.Tensor | DisplaySource | None, mask: torch.Tensor,
                 latent: torch.Tensor | None = None, losses: dict[str, torch.Tensor] | None = None) -> None:
        self.loss = loss
        self.mask = mask
        self.latent = latent
        self.losses = {} if losses is None else losses
        self.pred_source = pred
        self._pred: torch.Tensor | None = None

    @property
    def pred(self) -> torch.Tensor | None:
        if self._pred is None and self.pred_source is not None:
            source = self.pred_source
            self._pred = source.float() if isinstance(source, torch.Tensor) else source.render()
        return self._pred

    @pred.setter
    def pred(self, value: torch.Tensor | DisplaySource | None) -> None:
        self.pred_source, self._pred = value, None

    @property
    def pred_ready(self) -> bool:
        """Whether the display image has been made (for tests: the training step must not make it)."""
        return self._pred is not None
