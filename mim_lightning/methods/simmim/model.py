"""SimMIM: a simple framework for masked image modeling (Xie et al., CVPR 2022), following
microsoft/SimMIM ``models/simmim.py``.

The encoder (Swin or a BEiT-style ViT) processes **all** tokens: hidden ones are replaced by one
learnable mask token right after the patch embedding (Swin: after the patch LayerNorm). A 1x1 conv
to ``stride**2 * 3`` channels followed by ``PixelShuffle(stride)`` turns the final feature map
(stride 32 for Swin, the patch size 16 for ViT) back into an image, and the loss is the L1 error on
the hidden pixels of the normalized image (no per-patch normalization):
``sum(|pred - x| * m) / (sum(m) + 1e-5) / 3``.

Masks are made in the data transform (``mask=simmim``: ``ceil(ratio * units)`` random 32px units,
expanded to the model-patch grid) and passed in; ``model(images)`` without a mask draws one on the
device with the same rule (the model's ``mask_generator``: the data's generator instance, or its own
``SimMIMMask(mask_ratio, mask_unit)`` under ``mask=null``).

Differences from the official code, none of which changes the loss for given weights and mask:
- Attention runs through timm's fused ``scaled_dot_product_attention`` (same math, not bit-identical).
- The Swin window defaults to ``backbone.simmim_window_size`` (6, 12 for Swin-L) *at 192px* and scales
  with the image (7/14 at 224px, 2/4 at 64px) so small test images work; the official code takes one
  fixed ``WINDOW_SIZE``. Set ``window_size`` explicitly for that (the paper experiments do).
- ``drop_path_rate=None`` picks the official per-family value (ViT 0.1, Swin 0.0). With stochastic depth
  the loss of a model in training mode is random; in eval mode the same weights, mask and images give
  the same loss.
- A per-batch mask (1, gh, gw), as a generator with ``per_batch=True`` produces, is broadcast to the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.geometry import to_pair
from mim_lightning.losses import masked_pixel_l1
from mim_lightning.masking import MaskGenerator, SimMIMMask, model_mask_generator
from mim_lightning.models.backbones import require_family
from mim_lightning.models.backbones.simmim_vit import SimMIMViTEncoder, simmim_vit_from_spec
from mim_lightning.models.backbones.swin import SwinEncoder, swin_from_spec
from mim_lightning.models.output import MIMOutput

#: Official stochastic depth in SimMIM pretraining (ViT-B 800ep config: 0.1; every Swin config: 0.0).
DROP_PATH_RATE = {"vit": 0.1, "swin": 0.0}


class SimMIM(nn.Module):
    """SimMIM pretraining model: ``model(images, mask=None) -> MIMOutput``.

    Args:
        backbone: a ``vit`` or ``swin`` backbone spec (``conf/backbone/*.yaml``).
        img_size: input size in pixels; a multiple of the mask unit (and, for Swin, of the stride 32
            and compatible with the window).
        mask_ratio, mask_unit: the rule of the model's own masks (``mask=None``) when no ``mask_generator``
            is given (official 0.6 and 32px; ``ceil`` count), and the checks of the image size against the unit.
        window_size: Swin window; None scales ``backbone.simmim_window_size`` (the window at 192px)
            with the image (see :func:`~mim_lightning.models.backbones.swin.simmim_window_size`).
        drop_path_rate: stochastic depth; None picks the official value of the family (ViT 0.1, Swin 0).
        mask_generator: the rule of the model's own masks, on the model-patch grid: the run's ``mask`` group
            generator, the instance that draws the data's masks (``build_pretrain_module`` passes it). None
            (``mask=null``, or a model built by hand): :class:`~mim_lightning.masking.SimMIMMask` from
            ``mask_ratio`` and ``mask_unit``, drawn on the device.

    Shapes: images (B, 3, H, W) normalized; ``mask`` (B, H/p, W/p) bool on the model-patch grid
    (p = 4 for Swin: (B, 48, 48) at 192px; p = 16 for ViT-B: (B, 14, 14) at 224px). Output ``pred``
    (B, 3, H, W) is the head output (normalized pixels); ``latent`` the encoder's final-norm tokens,
    (B, 1 + L, D) with cls first for ViT, (B, H/32 * W/32, C) for Swin.
    """

    families = ("swin", "vit")

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int] = 192, mask_ratio: float = 0.6,
                 mask_unit: int = 32, window_size: int | None = None, drop_path_rate: float | None = None,
                 in_chans: int = 3, mask_generator: MaskGenerator | None = None) -> None:
        super().__init__()
        require_family(backbone, self.families, "SimMIM")
        self.family = str(backbone["family"])
        img_size = to_pair(img_size)
        patch_size = int(backbone["patch_size"])
        # Checks mask.unit against the patch and data.image_size against the unit (one-line errors).
        self.mask_generator = model_mask_generator(
            mask_generator, lambda: SimMIMMask(img_size, patch_size, mask_ratio, mask_unit),
            img_size, patch_size, "backbone.patch_size (SimMIM's model-patch grid)")
        rate = DROP_PATH_RATE[self.family] if drop_path_rate is None else float(drop_path_rate)
        if self.family == "swin":
            self.encoder: SwinEncoder | SimMIMViTEncoder = swin_from_spec(
                backbone, img_size, window_size=window_size, drop_path_rate=rate, in_chans=in_chans)
        else:
            self.encoder = simmim_vit_from_spec(backbone, img_size, drop_path_rate=rate, in_chans=in_chans)
        self.patch_size = patch_size
        self.grid = self.encoder.grid
        self.encoder_stride = self.encoder.stride
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.num_features, self.encoder_stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )

    def check_mask(self, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
        """A (B, gh, gw) or (1, gh, gw) mask (or flat (B, gh*gw)) -> bool (B, gh, gw)."""
        gh, gw = self.grid
        if mask.ndim == 2 and mask.shape[1] == gh * gw:
            mask = mask.reshape(mask.shape[0], gh, gw)
        if mask.ndim != 3 or tuple(mask.shape[1:]) != (gh, gw) or mask.shape[0] not in (1, batch_size):
            raise ConfigError("mask", tuple(mask.shape), f"a ({batch_size}, {gh}, {gw}) bool mask on the "
                              f"{self.patch_size}px model-patch grid (mask.patch_size=backbone.patch_size)")
        return mask.bool().expand(batch_size, gh, gw)


    def pooled_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """The encoder without a mask token. ViT: final-norm patch tokens (mean) or cls; Swin: the mean of the
        final-norm last-stage map. ``(B, num_features)``."""
        from mim_lightning.models.features import pool_cls_tokens, pool_tokens

        tokens = self.encoder.forward_tokens(images, None)
        if self.family == "vit":
            return pool_cls_tokens(tokens, pool)
        return pool_tokens(tokens, pool, "Swin")  # (B, h, w, C)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        batch = images.shape[0]
        if mask is None:
            mask = self.mask_generator.draw(batch, device=images.device)
        mask = self.check_mask(mask, batch).to(images.device, non_blocking=True)  # a host mask: no sync
        tokens = self.encoder.forward_tokens(images, mask)
        pred = self.decoder(self.encoder.to_map(tokens))
        loss = masked_pixel_l1(pred, images, mask)
        latent = tokens if tokens.ndim == 3 else tokens.flatten(1, 2)
        return MIMOutput(loss=loss, pred=pred, mask=mask, latent=latent)  # ``output.pred`` is float on read
