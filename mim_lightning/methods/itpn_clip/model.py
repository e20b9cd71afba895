"""iTPN-CLIP pretraining, following sunsmarterjie/iTPN ``itpn_clip/modeling_pretrain.py`` and
``engine_for_pretraining.py``: a HiViT student with an integrally pretrained feature pyramid regresses a
frozen CLIP teacher's normalized patch features.

- Mask: BEiT block-wise, from the data transform (``mask=block``: ~75 of 196 units). ``mask=None``
  draws with the model's ``mask_generator`` (the data's instance; :class:`mim_lightning.masking.BlockMask`
  under ``mask=null``) from the global torch RNG.
- Encoder: *all* units go through the MLP stems; at main-stage entry hidden units are replaced by a
  learnable ``mask_token`` (``x * (1 - w) + mask_token * w``), then APE, then ``depth`` attention blocks
  with a relative position bias and layer scale (``gamma`` init 0.1; stem blocks too).
- Heads: the pyramid (``fpn_depth`` 1) levels are embedded to C, C/4 and C/16 per sub-token (C per unit),
  summed, LN-ed and projected by ``lm_head`` to the teacher width. An auxiliary branch takes the main
  stage after block ``int(0.75 * depth)``, runs ``aux_depth`` (2) more attention blocks
  (``cls_pt_layers``), ``norm_cls`` and ``lm_cls_head``.
- Loss: ``SmoothL1(lm_head, t) + SmoothL1(lm_cls_head, t)`` (beta 1, mean over *all* units and
  channels) with ``t = LayerNorm(no affine)(teacher patch tokens)``.

Teacher (:class:`ClipTeacher`): a timm CLIP ViT (default ``vit_base_patch16_clip_quickgelu_224.openai``,
the OpenAI ViT-B/16 architecture with QuickGELU) built with ``pretrained=False`` and loaded from the local
file ``teacher.checkpoint`` (timm or OpenAI/open_clip state-dict keys, both understood by timm's filter),
or an open_clip model when ``teacher.source=open_clip`` and ``open_clip`` is installed. Nothing downloads.
With no checkpoint the teacher is randomly initialised (from ``teacher.seed``) and a warning says that
this is for tests only; ``teacher.allow_random=false`` (the paper experiments) turns that into an error.
The teacher input is the student's image, un-normalized with ``data_mean/std`` to [0, 1], resized to
``unit grid x teacher patch`` (224 for a /16 teacher at 224 px, 196 for a /14 one: the official
``second_input_size``) and normalized with the CLIP mean/std. The teacher is frozen (no gradients,
always in eval mode) and its weights are **not** part of ``state_dict()`` / checkpoints: they are
rebuilt from ``teacher.checkpoint`` (or the seed) whenever the model is built.

Differences from the official code:
- Student normalization and teacher scaling. The official script normalizes the student with
  mean = std = 0.5 and its ``ScalingLayerForClip`` maps the teacher's [0, 1] tensor to [0.5, 1] before
  the CLIP normalization (a formula meant for [-1, 1] inputs). ``experiment=itpn_clip_b_in1k`` does both
  (``data.mean = data.std = 0.5``, ``teacher.official_scaling=true``), which gives the official loss;
  the method defaults keep ImageNet statistics and the plain CLIP normalization (``official_scaling``
  off, as mmpretrain), since the quirk only squeezes the teacher's input range.
- Teacher input. Officially the teacher gets a second resize of the same crop box with PIL Lanczos
  (``second_input_size``, ``second_interpolation='lanczos'``) while the student's is bicubic; here the
  teacher sees the student's bicubic crop, resized again in torch (bicubic, antialiased) only when the
  sizes differ. So the teacher input differs at 224 px too (Lanczos vs bicubic of the same box). Measured
  on 27 random crops of natural images with random-init CLIP-shaped teachers: the input differs by 1.3 %
  (relative L2) and the targets by 0.9 % (token cosine 0.99994) for a /16 teacher at 224 px; by 2.5 %
  and 1.5 % (cosine 0.99985) for a /14 teacher at 196 px (CLIP-L/14). A second image through the data
  pipeline would be needed to remove this; it is not done.
- ``output.pred`` cannot be a pixel reconstruction (the model predicts features): it is a per-unit
  grey map of the cosine similarity between the main head's prediction and the teacher target (black
  -1, white +1) in the input's normalized space, so the reconstruction callback shows where the
  student agrees with the teacher.
- ``mask_laterals`` (default off = official) zeroes the stem features of hidden units before they enter
  the pyramid; officially they come from the hidden units' own pixels, because the stems see every unit.
- The position embedding is the stored ``absolute_pos_embed``: all units enter the main stage, where the
  official ``interpolate_pos_encoding`` returns the table unchanged too (iTPN-pixel drops units and
  resamples it; see :mod:`mim_lightning.methods.itpn.model`).
- Per the official code, ``absolute_pos_embed`` is trunc-normal initialised (``ape_init``) and the two
  auxiliary blocks use LayerNorm eps 1e-5 (every other LN 1e-6).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mim_lightning.errors import ConfigError
from mim_lightning.masking import BlockMask, MaskGenerator, model_mask_generator
from mim_lightning.models.backbones import require_family
from mim_lightning.models.backbones.hivit import HiViT, HiViTBlock, hivit_from_spec, init_trunc_normal
from mim_lightning.models.pyramid import FeaturePyramid, check_pyramid_width, flat_unit_mask, pyramid_embed
from mim_lightning.models.output import MIMOutput

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_SOURCES = ("timm", "open_clip")
DEFAULT_TEACHER = "vit_base_patch16_clip_quickgelu_224.openai"

RANDOM_TEACHER_WARNING = (
    "iTPN-CLIP teacher '{name}' is RANDOMLY INITIALISED (teacher.checkpoint is null): the targets are "
    "meaningless, which is for tests only. Point method.model.teacher.checkpoint at a local CLIP checkpoint "
    "for real pretraining.")


def _pair_grid(grid: Sequence[int]) -> tuple[int, int]:
    return int(grid[0]), int(grid[1])


class ClipTeacher(nn.Module):
    """A frozen CLIP image tower that turns normalized student images into iTPN-CLIP targets.

    ``forward(images)``: images (B, 3, H, W) normalized with ``input_mean/std`` -> targets (B, gh*gw, dim),
    fp32, ``LayerNorm(no affine)`` of the projected, ``ln_post``-ed patch tokens (class token dropped).

    Args:
        grid: the student's unit grid; the teacher runs at ``grid * teacher_patch`` pixels so that its
            patch grid is the same.
        source: ``timm`` or ``open_clip``.
        model_name: a timm model name (with a pretrained tag, e.g. ``vit_base_patch16_clip_quickgelu_224.openai``,
            which sets the 512-wide projection head) or an open_clip model name (``ViT-B-16``).
        checkpoint: local weights file; None means a random teacher (tests only).
        model_kwargs: extra keyword arguments for the timm constructor (tests shrink the teacher with them).
        mean, std: the teacher's input normalization (CLIP's).
        input_mean, input_std: the normalization of the student images (``data.mean/std``).
        official_scaling: reproduce the official ``(x + 1) * 127.5 / 255`` quirk on the [0, 1] image.
        allow_random: when False, a missing checkpoint is a :class:`ConfigError`.
        seed: seeds the random init of a teacher without checkpoint (reproducible across builds).
    """

    def __init__(self, grid: Sequence[int], source: str = "timm", model_name: str = DEFAULT_TEACHER,
                 checkpoint: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 input_mean: Sequence[float] = IMAGENET_MEAN, input_std: Sequence[float] = IMAGENET_STD,
                 official_scaling: bool = False, allow_random: bool = True, seed: int = 0) -> None:
        super().__init__()
        if source not in TEACHER_SOURCES:
            raise ConfigError("method.model.teacher.source", source, ", ".join(TEACHER_SOURCES))
        self.grid = _pair_grid(grid)
        self.source = source
        self.model_name = str(model_name)
        self.official_scaling = bool(official_scaling)
        path = None
        if checkpoint not in (None, "", "null"):
            path = Path(str(checkpoint)).expanduser()
            if not path.is_file():
                raise ConfigError("method.model.teacher.checkpoint", str(checkpoint),
                                  "the path of a local CLIP weights file (nothing is downloaded)", "no such file")
        elif not allow_random:
            raise ConfigError("method.model.teacher.checkpoint", checkpoint,
                              "the path of a local CLIP weights file, e.g. a timm model.safetensors or an "
                              "open_clip_pytorch_model.bin", "this run does not allow a random teacher")
        else:
            warnings.warn(RANDOM_TEACHER_WARNING.format(name=self.model_name), UserWarning, stacklevel=3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            if source == "timm":
                self.model, self.patch_size, self.dim = self._build_timm(path, dict(model_kwargs or {}))
            else:
                self.model, self.patch_size, self.dim = self._build_open_clip(path, dict(model_kwargs or {}))
        self.image_size = (self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1])
        self.model.requires_grad_(False)
        self.register_buffer("input_mean", torch.tensor(input_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(input_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def _build_timm(self, path: Path | None, kwargs: dict[str, Any]) -> tuple[nn.Module, tuple[int, int], int]:
        import timm

        try:
            with torch.device("meta"):
                probe = timm.create_model(self.model_name, pretrained=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - unknown names and bad kwargs become one-line config errors
            raise ConfigError("method.model.teacher.model_name", self.model_name,
                              "a timm CLIP ViT name such as vit_base_patch16_clip_quickgelu_224.openai",
                              str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
        if patch is None or not hasattr(probe, "forward_features"):
            raise ConfigError("method.model.teacher.model_name", self.model_name, "a timm ViT (with patch_embed)")
        patch = _pair_grid(patch)
        kwargs["img_size"] = (self.grid[0] * patch[0], self.grid[1] * patch[1])
        if path is None:
            model = timm.create_model(self.model_name, pretrained=False, **kwargs)
        else:
            overlay = {"file": str(path)}
            if "num_classes" in kwargs:
                overlay["num_classes"] = kwargs["num_classes"]
            try:
                model = timm.create_model(self.model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            except Exception as exc:  # noqa: BLE001
                raise ConfigError("method.model.teacher.checkpoint", str(path),
                                  f"a weights file matching {self.model_name}",
                                  str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        dim = head.out_features if isinstance(head, nn.Linear) else int(model.num_features)
        return model, patch, dim

    def _build_open_clip(self, path: Path | None, kwargs: dict[str, Any]) -> tuple[nn.Module, tuple[int, int], int]:
        try:
            import open_clip
        except ImportError as exc:
            raise ConfigError("method.model.teacher.source", "open_clip",
                              "timm (open_clip is not installed: pip install open_clip_torch)") from exc
        config = open_clip.get_model_config(self.model_name)
        if not config:
            raise ConfigError("method.model.teacher.model_name", self.model_name, "an open_clip model name, e.g. ViT-B-16")
        patch = config["vision_cfg"].get("patch_size", 16)
        patch = _pair_grid(patch if isinstance(patch, (tuple, list)) else (patch, patch))
        size = (self.grid[0] * patch[0], self.grid[1] * patch[1])
        clip = open_clip.create_model(self.model_name, pretrained=None if path is None else str(path),
                                      force_image_size=size if size[0] != size[1] else size[0], **kwargs)
        visual = clip.visual
        visual.output_tokens = True
        return visual, patch, int(visual.output_dim)

    def train(self, mode: bool = True) -> "ClipTeacher":
        """The teacher never leaves eval mode (dropout, drop path and norms stay deterministic)."""
        return super().train(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalized images -> the teacher's normalized input at :attr:`image_size`."""
        x = images.float() * self.input_std + self.input_mean
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
        if self.official_scaling:
            x = ((x + 1.0) * 127.5).clamp(0.0, 255.0) / 255.0
        return (x - self.clip_mean) / self.clip_std

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) teacher input -> projected patch tokens (B, L, dim)."""
        if self.source == "timm":
            feats = self.model.forward_features(x)[:, getattr(self.model, "num_prefix_tokens", 1):]
            feats = getattr(self.model, "fc_norm", nn.Identity())(feats)
            head = self.model.get_classifier()
            return head(feats) if isinstance(head, nn.Linear) else feats
        _, feats = self.model(x)
        proj = getattr(self.model, "proj", None)
        return feats @ proj if proj is not None else feats

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        target = self.tokens(self.prepare(images))
        return F.layer_norm(target.float(), target.shape[-1:])


def _drop_teacher_keys(keys: list[str]) -> None:
    keys[:] = [k for k in keys if not (k.startswith("teacher.") or ".teacher." in k)]


class ITPNClip(nn.Module):
    """iTPN-CLIP pretraining model: ``model(images, mask=None) -> MIMOutput``.

    Args:
        backbone: a ``hivit`` backbone spec.
        img_size: input size in pixels.
        teacher: :class:`ClipTeacher` options (``source``, ``model_name``, ``checkpoint``, ``model_kwargs``,
            ``mean``, ``std``, ``official_scaling``, ``allow_random``, ``seed``).
        data_mean, data_std: the normalization of the input images (``data.mean/std``).
        mask_ratio, mask_min_block: the model's own block masks (``mask=None``) when no ``mask_generator`` is
            given (0.4, 16).
        fpn_dim, fpn_depth: pyramid width (256) and blocks per up-sampling step (1).
        layer_scale_init: ``gamma`` init of every encoder block (0.1).
        drop_path_rate: stochastic depth over stems + main stage (0.1 for B, 0.2 for L).
        rpe: relative position bias in the main and auxiliary blocks (on).
        ape_init: ``trunc_normal`` as the official CLIP code, or ``sincos``.
        aux_depth: blocks in the auxiliary branch (2); it taps main block ``int(0.75 * depth)``.
        mask_laterals: zero the stem features of hidden units before the pyramid (default off = official).
        loss_beta: SmoothL1 beta (1).
        mask_generator: the rule of the model's own masks, on the unit grid: the run's ``mask`` group
            generator, the instance that draws the data's masks (``build_pretrain_module`` passes it). None
            (``mask=null``, or a model built by hand): :class:`~mim_lightning.masking.BlockMask` from
            ``mask_ratio`` and ``mask_min_block``.

    ``output.latent`` is the main-stage output for all units (B, N, C); ``output.losses`` has ``loss_main``
    and ``loss_aux``. Teacher weights are left out of ``state_dict()`` and ignored by ``load_state_dict``.
    """

    families = ("hivit",)

    def __init__(self, backbone: Mapping[str, Any], img_size: int | Sequence[int] = 224,
                 teacher: Mapping[str, Any] | None = None, data_mean: Sequence[float] = IMAGENET_MEAN,
                 data_std: Sequence[float] = IMAGENET_STD, mask_ratio: float = 0.4, mask_min_block: int = 16,
                 fpn_dim: int = 256, fpn_depth: int = 1, layer_scale_init: float | None = 0.1,
                 drop_path_rate: float = 0.1, rpe: bool = True, ape_init: str = "trunc_normal", aux_depth: int = 2,
                 mask_laterals: bool = False, loss_beta: float = 1.0, in_chans: int = 3,
                 mask_generator: MaskGenerator | None = None) -> None:
        super().__init__()
        require_family(backbone, self.families, "iTPN-CLIP")
        self.encoder: HiViT = hivit_from_spec(backbone, img_size, drop_path_rate=drop_path_rate, rpe=rpe,
                                              ape_init=ape_init, layer_scale_init=layer_scale_init, in_chans=in_chans)
        dim = self.encoder.embed_dim
        check_pyramid_width(dim, "backbone.embed_dim")
        self.grid = self.encoder.grid
        self.patch_size = self.encoder.patch_size
        self.mask_generator = model_mask_generator(
            mask_generator,
            lambda: BlockMask(self.encoder.img_size, self.patch_size, mask_ratio, min_block=int(mask_min_block)),
            self.encoder.img_size, self.patch_size, "backbone.patch_size (iTPN's unit grid)")
        self.mask_laterals = bool(mask_laterals)
        self.loss_beta = float(loss_beta)
        if isinstance(aux_depth, bool) or not isinstance(aux_depth, int) or aux_depth < 0:
            raise ConfigError("method.model.aux_depth", aux_depth, "a non-negative integer (official 2)")
        depth = self.encoder.depth
        self.aux_index = int(0.75 * depth)
        mlp_ratio = float(backbone.get("mlp_ratio", 4.0))
        num_heads = int(backbone["num_heads"])

        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pyramid = FeaturePyramid(dim, fpn_dim, fpn_depth, mlp_ratio)
        self.decoder_embed = pyramid_embed(dim, fpn_dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        rates = torch.linspace(0, drop_path_rate, sum(self.encoder.mlp_depth) + depth, device="cpu").tolist()
        first = sum(self.encoder.mlp_depth) + self.aux_index
        self.cls_pt_layers = nn.ModuleList(
            HiViTBlock(dim, num_heads, mlp_ratio, drop_path=rates[min(first + i, len(rates) - 1)], norm_eps=1e-5,
                       rpe_grid=self.grid if rpe else None, layer_scale_init=layer_scale_init)
            for i in range(aux_depth)
        )
        self.norm_cls = nn.LayerNorm(dim, eps=1e-6)
        self.teacher = ClipTeacher(self.grid, input_mean=data_mean, input_std=data_std, **dict(teacher or {}))
        self.lm_head = nn.Linear(dim, self.teacher.dim)
        self.lm_cls_head = nn.Linear(dim, self.teacher.dim)
        self.register_buffer("data_mean", torch.tensor(data_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("data_std", torch.tensor(data_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.reset_parameters()
        self.register_state_dict_post_hook(self._state_dict_without_teacher)
        self.register_load_state_dict_post_hook(self._ignore_missing_teacher)

    def reset_parameters(self) -> None:
        for module in (self.pyramid, self.decoder_embed, self.norm, self.cls_pt_layers, self.norm_cls, self.lm_head,
                       self.lm_cls_head):
            module.apply(init_trunc_normal)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-2.0, b=2.0)
        for block in self.cls_pt_layers:
            if block.attn.relative_position_bias_table is not None:
                nn.init.zeros_(block.attn.relative_position_bias_table)

    @staticmethod
    def _state_dict_without_teacher(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
            del state_dict[key]

    @staticmethod
    def _ignore_missing_teacher(module: nn.Module, incompatible_keys) -> None:
        _drop_teacher_keys(incompatible_keys.missing_keys)

    def default_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """The masks of ``mask=None``: the ``mask_generator``'s draw (BEiT block masks by default, from a numpy
        generator seeded by the global torch RNG)."""
        mask = self.mask_generator.draw(batch, device=device)
        return mask.expand(batch, *mask.shape[1:]) if mask.shape[0] == 1 else mask  # a per-batch rule: shared

    def predict(self, images: torch.Tensor, flat_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(main-head prediction, auxiliary prediction) both (B, N, teacher_dim), and the main-stage output (B, N, C)."""
        x, features = self.encoder.forward_stem(images)
        w = flat_mask[:, :, None].to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        if self.mask_laterals:
            features = [f * (1 - w[:, :, :, None, None]) for f in features]
        latent, tapped = self.encoder.forward_main(x, taps=(self.aux_index,))
        levels = self.pyramid(latent, features)
        batch, length = flat_mask.shape
        fused = sum(embed(level).reshape(batch, length, -1) for embed, level in zip(self.decoder_embed, levels))
        main = self.lm_head(self.norm(fused))
        aux = tapped[self.aux_index]
        rpe_index = self.encoder.rpe_index()
        for block in self.cls_pt_layers:
            aux = block(aux, rpe_index)
        return main, self.lm_cls_head(self.norm_cls(aux)), latent

    def agreement_map(self, pred: torch.Tensor, target: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-unit cosine similarity as a grey image (B, 3, H, W) in the input's normalized space."""
        return AgreementMap(self, pred, target, batch).render()


    def pooled_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Stems and main stage on every unit (no mask token); the mean of the main-stage tokens."""
        from mim_lightning.models.features import pool_tokens

        return pool_tokens(self.encoder(images), pool, "HiViT")

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> MIMOutput:
        batch = images.shape[0]
        if mask is None:
            mask = self.default_mask(batch, images.device)
        flat_mask = flat_unit_mask(mask, batch, self.grid).to(images.device, non_blocking=True)  # a host mask: no sync
        target = self.teacher(images)
        main, aux, latent = self.predict(images, flat_mask)
        loss_main = F.smooth_l1_loss(main.float(), target, beta=self.loss_beta)
        loss_aux = F.smooth_l1_loss(aux.float(), target, beta=self.loss_beta)
        # the agreement map is made only when ``output.pred`` is read (reconstruction callback, eval)
        return MIMOutput(loss=loss_main + loss_aux, pred=AgreementMap(self, main, target, batch),
                         mask=flat_mask.reshape(batch, *self.grid), latent=latent,
                         losses={"loss_main": loss_main.detach(), "loss_aux": loss_aux.detach()})


class AgreementMap:
    """``output.pred`` of :class:`ITPNClip`, rendered on first read (see :class:`~mim_lightning.models.output.MIMOutput`)."""

    def __init__(self, model: ITPNClip, pred: torch.Tensor, target: torch.Tensor, batch: int) -> None:
        self.pred, self.target, self.batch = pred.detach(), target.detach(), batch
        self.grid, self.patch_size = model.grid, model.patch_size
        self.data_mean, self.data_std = model.data_mean, model.data_std

    def render(self) -> torch.Tensor:
        with torch.no_grad():
            grey = (F.cosine_similarity(self.pred.float(), self.target.float(), dim=-1) + 1.0) / 2.0
            grey = grey.reshape(self.batch, 1, *self.grid).expand(-1, 3, -1, -1)
            grey = (grey - self.data_mean) / self.data_std
            return grey.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)


__all__ = ["AgreementMap", "ClipTeacher", "ITPNClip"]
