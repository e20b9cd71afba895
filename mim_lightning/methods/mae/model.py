"""MAE: masked autoencoder (He et al., 2022), following facebookresearch/mae ``models_mae.py``.

The ViT encoder sees only the visible patches (plus cls); a light transformer decoder fills the
hidden positions with one shared mask token and predicts their pixels; the loss is the per-patch
MSE on hidden patches against (optionally per-patch normalized) pixels.

Differences from the official code, none of which changes the loss for a given mask:
- The mask can be passed in (bool grid, True = hidden). With an explicit mask the visible tokens
  enter the encoder in raster order instead of the random order of ``argsort(noise)``; attention
  is permutation-equivariant, so the outputs are the same up to that order.
- Attention uses timm's fused ``scaled_dot_product_attention`` (same math, not bit-identical to
  timm 0.3.2's explicit softmax).
- The mask may live on the CPU while the images are on the GPU: the number of kept patches (a tensor
  shape) is read where the mask is, so a host mask costs no device sync
  (see :func:`mim_lightning.models.tokens.kept_count`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mim_lightning.losses import masked_mse, normalize_patches, patchify
from mim_lightning.masking import MaskGenerator, RandomMask, model_mask_generator
from mim_lightning.models.backbones import check_heads, require_family
from mim_lightning.models.backbones.vit import ViTEncoder, init_linear_and_norm, vit_from_spec
from mim_lightning.models.output import MIMOutput, PatchPixels
from mim_lightning.models.pos_embed import sincos_2d
from mim_lightning.models.tokens import device_unit_mask, visible_first_order


class MAEDecoder(nn.Module):
    """MAE's decoder: Linear to ``dim``, mask tokens at hidden positions, fixed sin-cos positions,
    ``depth`` timm Blocks, LayerNorm and a Linear to ``p*p*3`` pixel values per patch."""

    def __init__(self, encoder_dim: int, grid: tuple[int, int], patch_size: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, in_chans: int = 3, norm_eps: float = 1e-6) -> None:
        super().__init__()
        check_heads(dim, num_heads, "method.model.decoder_heads")
        self.grid = grid
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + 1, dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)
        )
        self.decoder_norm = norm_layer(dim)
        self.decoder_pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], self.grid, cls_token=True).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_linear_and_norm)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + K, De) with cls first; ids_restore (B, L) -> per-patch predictions (B, L, p*p*C)."""
        x = self.decoder_embed(latent)
        batch, length = ids_restore.shape
        fill = self.mask_token.expand(batch, length - (x.shape[1] - 1), -1)
        patches = torch.cat([x[:, 1:], fill], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


class MaskedAutoencoder(nn.Module):
    """MAE pretraining model: ``model(images, mask=None) -> MIMOutput``.

    Args:
        backbone: a ``vit`` backbone spec (``conf/backbone/vit_*.yaml``).
        img_size: input size in pixels, a multiple of the patch size.
        mask_ratio: hidden fraction of the model's own masks (``mask=None``) when no ``mask_generator`` is
            given: MAE's ``random_masking`` (official 0.75).
        norm_pix_loss: regress per-patch normalized pixels (used by the released checkpoints).
        decoder_dim, decoder_depth, decoder_heads: decoder width, blocks and heads (official 512, 8, 16).
        mask_generator: the rule of the model's own masks, on its patch grid: the run's ``mask`` group
            generator, the same instance that draws the data's masks (``build_pretrain_module`` passes it).
            None (``mask=null``, or a model built by hand): :class:`~mim_lightning.masking.RandomMask` at
            ``mask_ratio``. Its :meth:`~mim_lightning.masking.MaskGenerator.draw` runs on the device.
    """

    families = ("vit",)

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int] = 224, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 in_chans: int = 3, mask_generator: MaskGenerator | None = None) -> None:
        super().__init__()
        require_family(backbone, self.families, "MAE")
        check_heads(int(backbone["embed_dim"]), int(backbone["num_heads"]), "backbone.num_heads")
        self.norm_pix_loss = norm_pix_loss
        self.encoder: ViTEncoder = vit_from_spec(dict(backbone), img_size, in_chans=in_chans)
        self.patch_size = self.encoder.patch_size
        self.grid = self.encoder.grid
        self.mask_generator = model_mask_generator(
            mask_generator, lambda: RandomMask(self.encoder.img_size, self.patch_size, mask_ratio),
            self.encoder.img_size, self.patch_size, "backbone.patch_size (MAE's patch grid)")
        self.decoder = MAEDecoder(self.encoder.embed_dim, self.grid, self.patch_size, decoder_dim, decoder_depth,
                                  decoder_heads, float(backbone.get("mlp_ratio", 4.0)), in_chans)


    def pooled_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """The encoder on all patches (no ``keep_ids``): the final-norm patch tokens' mean, or the cls token
        (``pool="cls"``, MAE's linear-probe protocol). ``(B, embed_dim)``."""
        from mim_lightning.models.features import pool_cls_tokens

        return pool_cls_tokens(self.encoder(images), pool)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        batch = images.shape[0]
        flat_mask, len_keep = device_unit_mask(mask, batch, self.grid, self.mask_generator, images.device)
        ids_shuffle, ids_restore, len_keep = visible_first_order(flat_mask, len_keep)
        latent = self.encoder(images, keep_ids=ids_shuffle[:, :len_keep])
        return self.reconstruction_output(images, self.decoder(latent, ids_restore), flat_mask, latent)

    def reconstruction_output(self, images: torch.Tensor, pred: torch.Tensor, flat_mask: torch.Tensor,
                              latent: torch.Tensor) -> MIMOutput:
        """The loss (MSE on hidden patches, per-patch normalized targets with ``norm_pix_loss``) and the
        output of decoder predictions ``pred`` (B, L, p*p*C) for ``images`` under ``flat_mask`` (B, L)."""
        target = patchify(images, self.patch_size)
        mean = var = None
        if self.norm_pix_loss:
            normalized, mean, var = normalize_patches(target)
            loss = masked_mse(pred, normalized, flat_mask)
        else:
            loss = masked_mse(pred, target, flat_mask)
        # the display image is made only when ``output.pred`` is read (reconstruction callback, eval)
        display = PatchPixels(pred, self.patch_size, self.grid, images.shape[1], mean, var)
        return MIMOutput(loss=loss, pred=display, mask=flat_mask.reshape(images.shape[0], *self.grid), latent=latent)
