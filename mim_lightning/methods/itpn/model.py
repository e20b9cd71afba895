"""iTPN pixel pretraining (Tian et al., CVPR 2023), following sunsmarterjie/iTPN ``itpn_pixel/models/models_itpn_mim.py``.

A HiViT encoder runs on the visible mask units only (hidden units are dropped right after the patch
embedding, so every stage, the pyramid included, sees visible units only). A three-level feature
pyramid is built *inside* each visible unit from the main-stage output and the two stem features
(1x1, 2x2 and 4x4 sub-tokens per unit, ``fpn_dim`` wide). The decoder embeds each level to
``decoder_dim`` per unit, appends the shared mask token at hidden units, un-shuffles and sums the three
levels (+ fixed sin-cos positions), then runs ``decoder_depth`` transformer blocks and predicts the
16x16x3 pixels of every unit. The loss is MAE's per-unit norm-pix MSE on hidden units, so the pyramid
is pretrained together with the backbone ("integrally").

Trace for iTPN-B at 224 px (B images, 49 of 196 units visible):
    patch_embed (B,196,4,4,128) -> keep (B,49,4,4,128) -> 3 MLP [f4] -> merge (B,49,2,2,256) -> 3 MLP [f8]
    -> merge (B,49,512) -> +APE -> 24 blocks (B,49,512)
    pyramid: (B,49,1,1,256), (B,49,2,2,256), (B,49,4,4,256)
    decoder_embed: 3 x (B,49,512) -> + mask tokens, unshuffle (B,196,512) -> sum + pos -> 8 blocks -> (B,196,768)

Position embedding: the official encoder adds a bicubically *resampled* copy of ``absolute_pos_embed``
to the kept units (its ``interpolate_pos_encoding`` resamples whenever fewer than all units are present;
see :mod:`mim_lightning.models.backbones.hivit`). ``official_pos_resample=True`` (the default and
``conf/method/itpn.yaml``) does the same, so the loss equals the official one on the same weights, mask
and images. ``False`` adds the stored table instead (the loss moves by 1e-6 to 1e-5 relative at
iTPN-B/224 in eval fp32: 1.9e-6 with random weights and noise images): then pretraining and
finetuning add the same table. Finetuning, export and the
encoder on all units (``encoder(images)``) always add the stored table, as the official finetuning
does; official checkpoints, and ones pretrained here with the switch on, were trained through the
resampled copy, so their finetune starts from a table the main stage never saw exactly (max 0.1 apart
at the sin-cos init).

Differences from the official code, none of which changes the loss for a given mask:
- The mask can be passed in (bool unit grid, True = hidden); the visible units then enter the encoder
  in raster order instead of ``argsort(noise)`` order (attention is permutation-equivariant and nothing
  else mixes units). ``mask=None`` draws the model's ``mask_generator`` on the device (MAE's per-sample
  random mask unless the run's mask group says otherwise).
- Attention uses ``F.scaled_dot_product_attention``.
- Weight init: as the official, trunc-normal(0.02) Linear weights, zero biases, LN 1/0, default Conv
  init, sin-cos initialised learnable ``absolute_pos_embed``, frozen sin-cos decoder positions,
  ``mask_token`` ~ N(0, 0.02).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mim_lightning.losses import masked_mse, normalize_patches, patchify
from mim_lightning.masking import MaskGenerator, RandomMask, model_mask_generator
from mim_lightning.models.backbones import check_heads, require_family
from mim_lightning.models.backbones.hivit import HiViT, HiViTBlock, hivit_from_spec, init_trunc_normal
from mim_lightning.models.output import MIMOutput, PatchPixels
from mim_lightning.models.pyramid import FeaturePyramid, check_pyramid_width, flat_unit_mask, pyramid_embed
from mim_lightning.models.pos_embed import sincos_2d
from mim_lightning.models.tokens import device_unit_mask, visible_first_order


class PyramidDecoder(nn.Module):
    """The iTPN-pixel decoder: fuse the three pyramid levels with mask tokens, then a ViT decoder.

    ``forward(levels, ids_restore)``: levels as :class:`FeaturePyramid` returns them for the K visible
    units; ids_restore (B, N). Each level is embedded to (B, K, dim), padded with the *same* mask token
    to N units and un-shuffled; the sum ``lvl16 + pos + lvl8 + lvl4`` (hidden units get 3 * mask_token +
    pos) runs through ``depth`` blocks, LN and Linear(dim -> p*p*3). Output (B, N, p*p*3).
    """

    def __init__(self, fpn_dim: int, grid: tuple[int, int], patch_size: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, in_chans: int = 3, norm_eps: float = 1e-6) -> None:
        super().__init__()
        check_pyramid_width(dim, "method.model.decoder_dim")
        check_heads(dim, num_heads, "method.model.decoder_heads")
        self.grid = grid
        self.decoder_embed = pyramid_embed(dim, fpn_dim, norm_eps)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(HiViTBlock(dim, num_heads, mlp_ratio, norm_eps=norm_eps) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], self.grid).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_trunc_normal)

    def forward(self, levels: Sequence[torch.Tensor], ids_restore: torch.Tensor) -> torch.Tensor:
        batch, length = ids_restore.shape
        fused = None
        for level, embed in zip(levels, self.decoder_embed):
            x = embed(level).reshape(batch, level.shape[1], -1)
            x = torch.cat([x, self.mask_token.expand(batch, length - x.shape[1], -1).to(x.dtype)], dim=1)
            x = torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[-1]))
            fused = x + self.decoder_pos_embed if fused is None else fused + x
        for block in self.decoder_blocks:
            fused = block(fused)
        return self.decoder_pred(self.decoder_norm(fused))


@dataclass
class PyramidEncoding:
    """What the pixel encoder hands the decoder: ``levels`` (three (B, K, s, s, fpn_dim) tensors, s = 1, 2, 4),
    ``latent`` (B, K, C) main-stage tokens, ``ids_restore`` (B, N) and the flat ``mask`` (B, N)."""

    levels: list[torch.Tensor]
    latent: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


class ITPNPixel(nn.Module):
    """iTPN-pixel pretraining model: ``model(images, mask=None) -> MIMOutput``.

    Args:
        backbone: a ``hivit`` backbone spec (``conf/backbone/hivit_*.yaml``).
        img_size: input size in pixels, a multiple of the 16 px unit.
        mask_ratio: hidden fraction of the model's own masks (``mask=None``) when no ``mask_generator`` is
            given: MAE's per-sample random mask (official 0.75).
        norm_pix_loss: per-unit normalized pixel targets (hard-wired on in the official code).
        fpn_dim, fpn_depth: pyramid width (256) and MLP blocks per up-sampling step (2).
        decoder_dim, decoder_depth, decoder_heads: the fused decoder (official 512, 8, 16).
        drop_path_rate, rpe, ape_init: encoder options (official pretraining: 0, no RPE, sin-cos APE).
        official_pos_resample: add the official bicubic resampling of the position table to the kept
            units (True, official) or the stored table (False); see the module docstring.
        mask_generator: the rule of the model's own masks, on the 16 px unit grid: the run's ``mask`` group
            generator, the instance that draws the data's masks (``build_pretrain_module`` passes it). None
            (``mask=null``, or a model built by hand): :class:`~mim_lightning.masking.RandomMask` at ``mask_ratio``.

    ``output.latent`` holds the main-stage tokens of the visible units (B, K, C), in raster order.
    """

    families = ("hivit",)

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int] = 224, mask_ratio: float = 0.75,
                 norm_pix_loss: bool = True, fpn_dim: int = 256, fpn_depth: int = 2, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, drop_path_rate: float = 0.0, rpe: bool = False,
                 ape_init: str = "sincos", in_chans: int = 3, official_pos_resample: bool = True,
                 mask_generator: MaskGenerator | None = None) -> None:
        super().__init__()
        require_family(backbone, self.families, "iTPN")
        self.norm_pix_loss = bool(norm_pix_loss)
        self.encoder: HiViT = hivit_from_spec(backbone, img_size, drop_path_rate=drop_path_rate, rpe=rpe,
                                              ape_init=ape_init, in_chans=in_chans,
                                              official_pos_resample=official_pos_resample)
        self.patch_size = self.encoder.patch_size
        self.grid = self.encoder.grid
        self.mask_generator = model_mask_generator(
            mask_generator, lambda: RandomMask(self.encoder.img_size, self.patch_size, mask_ratio),
            self.encoder.img_size, self.patch_size, "backbone.patch_size (iTPN's unit grid)")
        mlp_ratio = float(backbone.get("mlp_ratio", 4.0))
        self.pyramid = FeaturePyramid(self.encoder.embed_dim, fpn_dim, fpn_depth, mlp_ratio)
        self.decoder = PyramidDecoder(fpn_dim, self.grid, self.patch_size, decoder_dim, decoder_depth, decoder_heads,
                                      mlp_ratio, in_chans)

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> PyramidEncoding:
        """Drop hidden units after the patch embedding, run stems, main stage and pyramid on the rest."""
        batch = images.shape[0]
        # a host mask is counted on the host and copied without blocking (no device sync per step)
        flat_mask, len_keep = device_unit_mask(None if mask is None else flat_unit_mask(mask, batch, self.grid),
                                               batch, self.grid, self.mask_generator, images.device)
        ids_shuffle, ids_restore, len_keep = visible_first_order(flat_mask, len_keep)
        keep_ids = ids_shuffle[:, :len_keep]
        x, features = self.encoder.forward_stem(images, keep_ids)
        latent, _ = self.encoder.forward_main(x, keep_ids)
        return PyramidEncoding(self.pyramid(latent, features), latent, ids_restore, flat_mask)


    def pooled_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Stems and main stage on every unit; the mean of the main-stage tokens. HiViT has no final norm (the
        finetuning adds ``fc_norm``); the probes' BatchNorm and L2 normalization make the scale irrelevant."""
        from mim_lightning.models.features import pool_tokens

        return pool_tokens(self.encoder(images), pool, "HiViT")

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        encoding = self.encode(images, mask)
        pred = self.decoder(encoding.levels, encoding.ids_restore)
        target = patchify(images, self.patch_size)
        mean = var = None
        if self.norm_pix_loss:
            normalized, mean, var = normalize_patches(target)
            loss = masked_mse(pred, normalized, encoding.mask)
        else:
            loss = masked_mse(pred, target, encoding.mask)
        # the display image is made only when ``output.pred`` is read (reconstruction callback, eval)
        display = PatchPixels(pred, self.patch_size, self.grid, images.shape[1], mean, var)
        return MIMOutput(loss=loss, pred=display, mask=encoding.mask.reshape(images.shape[0], *self.grid),
                         latent=encoding.latent)
