"""ToyMIM: the project's ViT encoder on the visible patches; every hidden patch is predicted from the mean visible
token plus a learned position code (a linear pixel head), MSE on hidden patches only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mim_lightning.losses import masked_mse, patchify
from mim_lightning.masking import MaskGenerator, RandomMask
from mim_lightning.models.backbones.vit import vit_from_spec
from mim_lightning.models.features import pool_cls_tokens
from mim_lightning.models.output import MIMOutput, PatchPixels
from mim_lightning.models.tokens import device_unit_mask, visible_first_order


class ToyMIM(nn.Module):
    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int] = 32, mask_ratio: float = 0.5,
                 mask_generator: MaskGenerator | None = None) -> None:
        super().__init__()
        self.encoder = vit_from_spec(dict(backbone), img_size)
        self.patch_size, self.grid = self.encoder.patch_size, self.encoder.grid
        # the run's mask generator (api.build_pretrain_module passes it), else its own for mask=None
        self.mask_generator = mask_generator or RandomMask(self.encoder.img_size, self.patch_size, mask_ratio)
        dim = self.encoder.embed_dim
        self.position = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        self.head = nn.Linear(dim, self.patch_size ** 2 * 3)

    def pooled_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        return pool_cls_tokens(self.encoder(images), pool)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        batch = images.shape[0]
        flat_mask, len_keep = device_unit_mask(mask, batch, self.grid, self.mask_generator, images.device)
        ids_shuffle, _, len_keep = visible_first_order(flat_mask, len_keep)
        latent = self.encoder(images, keep_ids=ids_shuffle[:, :len_keep])
        pred = self.head(latent[:, 1:].mean(dim=1, keepdim=True) + self.position)
        loss = masked_mse(pred, patchify(images, self.patch_size), flat_mask)
        return MIMOutput(loss, PatchPixels(pred, self.patch_size, self.grid), flat_mask.reshape(batch, *self.grid),
                         latent)
