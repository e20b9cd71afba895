"""MixMAE: mixed and masked autoencoder (Lin et al., CVPR 2023), following Sense-X/MixMIM ``models_mixmim.py``.

Two images share one encoder pass: where the batch-shared mask is set, sample i's tokens come from
image B-1-i (the batch flipped). The MixMIM encoder (:mod:`mim_lightning.models.backbones.mixmim`)
lets a token attend only to tokens of its own source image. The decoder runs twice per sample
("dual reconstruction"): once with the mask-set positions replaced by the mask token (it rebuilds
image i there) and once with the complementary positions replaced (it rebuilds image B-1-i there).
Un-mixing puts every patch of every image back in place, and the loss is the norm-pix MSE over
**all** tokens (each one was hidden in one of the two mixes), a global mean as the official code.

Shapes at 224px for Swin-B (batch B): mask (1, 7, 7) -> encoder (B, 49, 1024) -> decoder_embed
(B, 49, 512) -> two fills (2B, 49, 512) -> 8 blocks -> (2B, 49, 3072) -> un-mix (B, 49, 3072) vs the
32px patches of the images (B, 49, 3072).

Differences from the official code, none of which changes the loss for a given mask:
- The mask can be passed in ((1, gh, gw) bool, True = take the partner image); ``mask=None`` draws
  one as the official ``random_masking`` (``int(L * r)`` units, ``r = mask_ratio + U(0, range)``).
- Same-image attention uses an exact ``-inf`` restriction through ``scaled_dot_product_attention``
  (the official subtracts 1e30 or 65500), and windows larger than a stage map use the rule of
  :func:`~mim_lightning.models.backbones.mixmim.stage_window` (identical at 224px).
- An odd batch is allowed and follows the official rule: the middle sample is mixed with itself.
  It still learns honestly: its tokens on each side of the mask attend only to their own side, so
  each decoder pass sees one side and rebuilds the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.losses import normalize_patches, patchify
from mim_lightning.masking import MaskGenerator, MixMask, model_mask_generator
from mim_lightning.models.backbones import check_heads, require_family
from mim_lightning.models.backbones.mixmim import DEFAULT_WINDOWS, MixMIMEncoder, mixmim_from_spec
from mim_lightning.models.backbones.vit import init_linear_and_norm
from mim_lightning.models.output import MIMOutput, PatchPixels
from mim_lightning.models.pos_embed import sincos_2d


def unmix(reconstruction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dual reconstruction -> one reconstruction per image: (2B, L, D), mask (1, L) or (L,) bool -> (B, L, D).

    Rows ``[:B]`` are the passes with the mask-set positions filled by the mask token (row i rebuilds
    image i there); rows ``[B:]`` fill the complementary positions (row i rebuilds image B-1-i where
    the mask is not set). So image i is ``first[i]`` where the mask is set and ``second[B-1-i]``
    elsewhere: the official ``x1 * mask + x2.flip(0) * (1 - mask)``.
    """
    first, second = reconstruction.chunk(2, dim=0)
    return torch.where(mask.reshape(1, -1, 1).bool(), first, second.flip(0))


class MixMAEDecoder(nn.Module):
    """Linear to ``dim``, the two complementary mask-token fills (batch doubled), fixed sin-cos
    positions (no cls), ``depth`` timm Blocks (LayerNorm eps 1e-5, qkv bias), LayerNorm and a Linear
    to ``stride*stride*3`` pixel values per output token.

    ``forward(latent, mask)``: latent (B, L, De), mask (1, L) bool -> (2B, L, stride^2 * C).
    """

    def __init__(self, encoder_dim: int, grid: tuple[int, int], stride: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, in_chans: int = 3) -> None:
        super().__init__()
        check_heads(dim, num_heads, "method.model.decoder_heads")
        self.grid = grid
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, stride * stride * in_chans)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], self.grid).unsqueeze(0))
        trunc_normal_(self.mask_token, std=0.02)  # official; timm's bounds are +-2 absolute
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_linear_and_norm)

    def forward(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        hidden = mask.reshape(1, -1, 1).bool()
        token = self.mask_token.to(x.dtype)
        first = torch.where(hidden, token, x)  # official x * (1 - mask) + mask_token * mask
        second = torch.where(hidden, x, token)  # official x * mask + mask_token * (1 - mask)
        x = torch.cat([first, second], dim=0) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))


class MixMAE(nn.Module):
    """MixMAE pretraining model: ``model(images, mask=None) -> MIMOutput``.

    ``mask``: (1, gh, gw) bool on the encoder's output grid (7x7 at 224px), True = the position takes
    the partner image (the batch flipped). A (gh, gw) mask is accepted too, and a (B, gh, gw) stack is
    reduced to its first row as the DataModule's batch collate does. The output's ``mask`` is the
    (1, gh, gw) mask used, ``pred`` the un-mixed reconstruction (B, 3, H, W) in the input's normalized
    pixel space (norm-pix predictions mapped back with each target patch's mean and variance) and
    ``latent`` the encoder output of the mixed images (B, gh*gw, 8 * embed_dim).

    Args:
        backbone: a ``swin`` backbone spec (``conf/backbone/swin_*.yaml``): patch_size, embed_dim,
            depths, num_heads, mlp_ratio.
        img_size: input size, a multiple of the encoder's total stride (32 for Swin).
        mask_ratio, mask_ratio_range: the model's own masks (``mask=None``) when no ``mask_generator`` is
            given (official 0.5 and 0).
        norm_pix_loss: regress per-patch normalized pixels (official recipe: True).
        window_size: per-stage windows (official [14, 14, 14, 7] at 224px; [16, 16, 24, 12] at 384px).
        mask_attention: restrict attention to same-image tokens (official); False is the paper's ablation.
        drop_path_rate: stochastic depth of the encoder (0 in the official pretraining).
        decoder_dim, decoder_depth, decoder_heads: decoder width, blocks and heads (official 512, 8, 16).
        mask_generator: the rule of the model's own masks, on the encoder's output grid (its ``patch_size``
            is the encoder's total stride ``backbone.patch_size * 2**(stages-1)``: ``backbone.stride``, which
            ``conf/mask/mixmae.yaml`` reads): the run's ``mask`` group generator, the instance that draws the
            data's masks (``build_pretrain_module`` passes it). None (``mask=null``, or a model built by hand):
            :class:`~mim_lightning.masking.MixMask` from ``mask_ratio`` and ``mask_ratio_range``.
    """

    families = ("swin",)
    #: Samples are mixed with their partner in the batch (the reconstruction view shows both mixes).
    mixes_batch = True

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int] = 224, mask_ratio: float = 0.5,
                 mask_ratio_range: float = 0.0, norm_pix_loss: bool = True,
                 window_size: Sequence[int] = DEFAULT_WINDOWS, mask_attention: bool = True,
                 drop_path_rate: float = 0.0, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 in_chans: int = 3, mask_generator: MaskGenerator | None = None) -> None:
        super().__init__()
        require_family(backbone, self.families, "MixMAE")
        self.norm_pix_loss = bool(norm_pix_loss)
        self.encoder: MixMIMEncoder = mixmim_from_spec(dict(backbone), img_size, window_size=list(window_size),
                                                       drop_path_rate=drop_path_rate, mask_attention=mask_attention,
                                                       in_chans=in_chans)
        self.stride = self.encoder.stride
        self.grid = self.encoder.out_grid
        length = self.grid[0] * self.grid[1]
        if length < 2:
            raise ConfigError("data.image_size", self.encoder.img_size[0],
                              f"at least two {self.stride}px mask units (e.g. {2 * self.stride})")
        self.mask_generator = model_mask_generator(
            mask_generator, lambda: MixMask(self.encoder.img_size, self.stride, mask_ratio, ratio_range=mask_ratio_range),
            self.encoder.img_size, self.stride,
            "the encoder's total stride (backbone.stride): MixMAE mixes on its output grid")
        self.decoder = MixMAEDecoder(self.encoder.num_features, self.grid, self.stride, decoder_dim, decoder_depth,
                                     decoder_heads, float(backbone.get("mlp_ratio", 4.0)), in_chans)

    def draw_mask(self, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A (1, gh, gw) mixing mask by the model's ``mask_generator`` (by default the official rule)."""
        return self.mask_generator.draw(1, device=device, generator=generator)[:1]

    def check_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Any accepted mask form -> (1, gh, gw) bool."""
        shape = tuple(mask.shape)
        if shape[-2:] != self.grid or mask.ndim not in (2, 3):
            raise ConfigError("mask", f"shape {shape}", f"(1, {self.grid[0]}, {self.grid[1]}): one mask for the batch on "
                              f"the {self.stride}px output grid (conf/mask/mixmae.yaml: mask.patch_size=backbone.stride)")
        return mask.reshape(-1, *self.grid)[:1].bool()


    def pooled_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """The plain Swin-W14 forward without a mixing mask; the mean of the final-norm last-stage tokens
        (MixMIM's finetuning pool). ``(B, num_features)``."""
        from mim_lightning.models.features import pool_tokens

        return pool_tokens(self.encoder(images), pool, "MixMIM")

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        mask = self.draw_mask(images.device) if mask is None else self.check_mask(mask.to(images.device, non_blocking=True))
        latent = self.encoder(images, mask)
        flat_mask = mask.reshape(1, -1)
        pred = unmix(self.decoder(latent, flat_mask), flat_mask).float()
        target = patchify(images, self.stride)
        mean = var = None
        if self.norm_pix_loss:
            target, mean, var = normalize_patches(target)
        loss = (pred - target.float()).pow(2).mean()
        # the display image is made only when ``output.pred`` is read (reconstruction callback, eval)
        display = PatchPixels(pred, self.stride, self.grid, images.shape[1], mean, var)
        return MIMOutput(loss=loss, pred=display, mask=mask, latent=latent)
