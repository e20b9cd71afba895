"""Export a trained encoder: ``python -m mim_lightning.export ckpt=<run>/checkpoints/last.ckpt out=encoder.safetensors``.

The file is a safetensors state dict with timm's key names, plus metadata (``timm_model``, ``timm_kwargs``
as JSON, ``family``, ``method``), for

- ViT (MAE pretraining checkpoints, and finetuning checkpoints of a ViT classifier, head dropped):
  ``timm.create_model(timm_model, pretrained=False, num_classes=0, checkpoint_path=out, **timm_kwargs)``
  gives a ``VisionTransformer`` whose ``forward_features`` equals the project's encoder output
  (cls + patch tokens after the final norm).
- Swin (SimMIM pretraining checkpoints): the official/SimMIM names with ``layers.{i}.downsample`` moved to
  timm's ``layers.{i+1}.downsample`` and the ``mask_token`` dropped; loads into timm's ``SwinTransformer``
  (``forward_features`` is the (B, H/32, W/32, C) final-norm map).
- SimMIM's BEiT-style ViT: timm ``Beit`` (``beit_base_patch16_224`` with the sizes in ``timm_kwargs``; no absolute
  position embedding, layer scale). A pretraining checkpoint gives the encoder with its one shared relative
  position bias table (``use_shared_rel_pos_bias=True``, ``global_pool='token'`` so that the final ``norm`` is
  kept; ``mask_token`` dropped): ``forward_features`` is the project encoder's (B, 1 + L, D) final-norm tokens. A
  finetuning checkpoint gives the classifier without its head (per-block tables, ``global_pool='avg'``,
  ``fc_norm``). The keys are the official SimMIM/BEiT names, so the file is also a valid ``pretrained=`` for
  finetuning. A SimMIM-ViT *linear-probe* checkpoint holds the unchanged pretrained encoder cut at the probed
  block: export the pretraining checkpoint instead.

MixMIM (Swin-W14 without shifts) and HiViT (iTPN-pixel and iTPN-CLIP) have no timm model. For them the file holds
the project encoder's own state dict (``model.encoder.*`` of the checkpoint, prefix removed; official key names, see
``mim_lightning.checkpoints``) with metadata ``format=mim_lightning``, ``builder`` (the function that builds the
encoder), ``backbone`` (the ``conf/backbone`` mapping, JSON), ``image_size`` and ``builder_kwargs`` (JSON); rebuild
with :func:`load_exported`::

    encoder = load_exported("encoder.safetensors")   # MixMIMEncoder / HiViT with the weights loaded
    tokens = encoder(images)                          # (B, N, C): MixMIM final-norm tokens / HiViT main-stage tokens
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mim_lightning.cli import EXIT_CONFIG_ERROR, fail
from mim_lightning.errors import ConfigError

#: timm names of the standard ViT sizes (embed_dim, depth, heads) -> size word.
VIT_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
             (1280, 32, 16): "huge"}
BEIT_SIZES = {(768, 12, 12): "base", (1024, 24, 16): "large"}
SWIN_SIZES = {(96, (2, 2, 6, 2)): "tiny", (96, (2, 2, 18, 2)): "small", (128, (2, 2, 18, 2)): "base",
              (192, (2, 2, 18, 2)): "large"}


def _square(size: Any) -> int | list[int]:
    if isinstance(size, (list, tuple)):
        return int(size[0]) if size[0] == size[1] else [int(s) for s in size]
    return int(size)


def vit_timm_spec(backbone: Mapping[str, Any], image_size: Any, global_pool: str = "token") -> tuple[str, dict]:
    """(timm model name, create_model kwargs) for a project ViT of these sizes."""
    dim, depth, heads, patch = (int(backbone["embed_dim"]), int(backbone["depth"]), int(backbone["num_heads"]),
                                int(backbone["patch_size"]))
    size = _square(image_size)
    name = f"vit_{VIT_SIZES.get((dim, depth, heads), 'base')}_patch{patch if patch in (14, 16) else 16}_224"
    kwargs = dict(img_size=size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                  mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), global_pool=global_pool)
    return name, kwargs


def beit_timm_spec(backbone: Mapping[str, Any], image_size: Any, shared_rel_pos_bias: bool,
                   global_pool: str) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) for SimMIM's BEiT-style ViT of these sizes (layer scale 0.1 as
    pretrained; the value is overwritten by the file's ``gamma`` weights)."""
    dim, depth, heads, patch = (int(backbone["embed_dim"]), int(backbone["depth"]), int(backbone["num_heads"]),
                                int(backbone["patch_size"]))
    name = f"beit_{BEIT_SIZES.get((dim, depth, heads), 'base')}_patch16_224"
    kwargs = dict(img_size=_square(image_size), patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                  mlp_ratio=float(backbone.get("mlp_ratio", 4.0)), init_values=0.1, use_abs_pos_emb=False,
                  use_rel_pos_bias=not shared_rel_pos_bias, use_shared_rel_pos_bias=shared_rel_pos_bias,
                  global_pool=global_pool)
    return name, kwargs


def swin_timm_spec(backbone: Mapping[str, Any], image_size: Any, window_size: int) -> tuple[str, dict]:
    dim, depths = int(backbone["embed_dim"]), tuple(int(d) for d in backbone["depths"])
    name = f"swin_{SWIN_SIZES.get((dim, depths), 'base')}_patch4_window7_224"
    kwargs = dict(img_size=_square(image_size), patch_size=int(backbone.get("patch_size", 4)), embed_dim=dim,
                  depths=list(depths), num_heads=[int(h) for h in backbone["num_heads"]], window_size=int(window_size),
                  mlp_ratio=float(backbone.get("mlp_ratio", 4.0)))
    return name, kwargs


def swin_to_timm(encoder_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official/SimMIM Swin encoder keys -> timm ``SwinTransformer`` keys (merging moves one stage up)."""
    out = {}
    for key, value in encoder_state.items():
        if key == "mask_token" or key.endswith(("relative_position_index", "attn_mask")):
            continue
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) + 1)
        out[".".join(parts)] = value
    return out


def timm_to_swin(timm_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`swin_to_timm` (timm ``layers.{i+1}.downsample`` -> official ``layers.{i}.downsample``)."""
    out = {}
    for key, value in timm_state.items():
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        out[".".join(parts)] = value
    return out


def encoder_for_timm(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(timm-keyed state dict, metadata) of a Lightning checkpoint of this project."""
    config = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
    backbone = config.get("backbone") or {}
    family = backbone.get("family")
    image_size = (config.get("data") or {}).get("image_size", 224)
    state = checkpoint["state_dict"]
    method_target = str(((config.get("method") or {}).get("model") or {}).get("_target_", ""))
    if "finetune" in config:  # a finetuning checkpoint: the classifier is a timm model already
        if family != "vit":
            raise ConfigError("ckpt", family, "a finetuning checkpoint of a ViT classifier")
        encoder = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.") and not k.startswith("model.head")}
        pool = "avg" if any(k.startswith("fc_norm.") for k in encoder) else "token"
        if "blocks.0.attn.q_bias" in encoder:  # SimMIM's BEiT-style ViT
            if "rel_pos_bias.relative_position_bias_table" in encoder:
                raise ConfigError("ckpt", "a SimMIM-ViT linear-probe checkpoint", "its pretraining checkpoint (the "
                                  "probe does not change the encoder and keeps only the blocks up to the probed one)")
            name, kwargs = beit_timm_spec(backbone, image_size, shared_rel_pos_bias=False, global_pool=pool)
        else:
            name, kwargs = vit_timm_spec(backbone, image_size, pool)
    elif family == "vit" and method_target.endswith("SimMIM"):
        encoder = {k[len("model.encoder."):]: v for k, v in state.items()
                   if k.startswith("model.encoder.") and k != "model.encoder.mask_token"}
        name, kwargs = beit_timm_spec(backbone, image_size, shared_rel_pos_bias=True, global_pool="token")
    elif family == "vit" and any(k.startswith("model.encoder.cls_token") for k in state):
        encoder = {k[len("model.encoder."):]: v for k, v in state.items() if k.startswith("model.encoder.")}
        name, kwargs = vit_timm_spec(backbone, image_size)
    elif family == "swin" and method_target.endswith("SimMIM"):
        from mim_lightning.models.backbones.swin import simmim_window_size

        window = ((config.get("method") or {}).get("model") or {}).get("window_size")
        window = int(window) if window is not None else simmim_window_size(backbone, image_size)
        encoder = swin_to_timm({k[len("model.encoder."):]: v for k, v in state.items() if k.startswith("model.encoder.")})
        name, kwargs = swin_timm_spec(backbone, image_size, window)
    elif method_target.endswith(("MixMAE", "ITPNPixel", "ITPNClip")):
        encoder = {k[len("model.encoder."):]: v for k, v in state.items() if k.startswith("model.encoder.")}
        model_cfg = (config.get("method") or {}).get("model") or {}
        if method_target.endswith("MixMAE"):
            builder = "mim_lightning.models.backbones.mixmim.mixmim_from_spec"
            kwargs = {"window_size": list(model_cfg.get("window_size") or [14, 14, 14, 7])}
        else:  # HiViT as the method built it: iTPN-CLIP with layer scale and relative position tables
            builder = "mim_lightning.models.backbones.hivit.hivit_from_spec"
            clip = method_target.endswith("ITPNClip")
            kwargs = {"rpe": bool(model_cfg.get("rpe", clip))}
            if clip and model_cfg.get("layer_scale_init", 0.1) is not None:
                kwargs["layer_scale_init"] = float(model_cfg.get("layer_scale_init", 0.1))
        meta = {"format": "mim_lightning", "family": str(family), "method": method_target, "builder": builder,
                "backbone": json.dumps(dict(backbone)), "image_size": json.dumps(image_size),
                "builder_kwargs": json.dumps(kwargs)}
        return {k: v.detach().contiguous().clone() for k, v in encoder.items()}, meta
    else:
        raise ConfigError("ckpt", f"{method_target or '?'} with a {family} backbone",
                          "a MAE (ViT), SimMIM (Swin or ViT), MixMAE or iTPN pretraining checkpoint, or a "
                          "ViT finetuning checkpoint",
                          "no timm model for this encoder")
    meta = {"format": "timm", "family": str(family), "method": method_target, "timm_model": name,
            "timm_kwargs": json.dumps(kwargs)}
    return {k: v.detach().contiguous().clone() for k, v in encoder.items()}, meta


def load_exported(path: str | Path) -> torch.nn.Module:
    """Rebuild a ``format=mim_lightning`` export (MixMIM, HiViT encoders) with its weights loaded (strict)."""
    import importlib

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != "mim_lightning":
        raise ConfigError("path", str(path), "a format=mim_lightning export (timm exports load with timm.create_model)")
    module, _, name = meta["builder"].rpartition(".")
    build = getattr(importlib.import_module(module), name)
    encoder = build(json.loads(meta["backbone"]), json.loads(meta["image_size"]), **json.loads(meta["builder_kwargs"]))
    encoder.load_state_dict(load_file(str(path)), strict=True)
    return encoder


def export(ckpt: str | Path, out: str | Path) -> dict[str, str]:
    """Write the encoder of Lightning checkpoint ``ckpt`` (a file, or the sharded folder of a ``trainer=fsdp`` run,
    which gives the same encoder as a DDP checkpoint of the same weights) to ``out`` (safetensors); returns the metadata."""
    from safetensors.torch import save_file

    path = Path(str(ckpt)).expanduser()
    if path.is_dir():  # the sharded checkpoint folder of a trainer=fsdp run: read whole on this one process
        from mim_lightning.parallel import is_sharded_checkpoint, load_sharded

        if not is_sharded_checkpoint(path):
            raise ConfigError("ckpt", str(ckpt), "a Lightning checkpoint (.ckpt file or sharded checkpoint folder)",
                              "a folder without meta.pt and .metadata")
    elif not path.is_file():
        raise ConfigError("ckpt", str(ckpt), "an existing Lightning checkpoint (.ckpt)", "no such file")
    try:
        checkpoint = load_sharded(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError("ckpt", str(ckpt), "a Lightning checkpoint (.ckpt)", f"cannot be read ({type(exc).__name__})") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ConfigError("ckpt", str(ckpt), "a Lightning checkpoint of mim_lightning (with state_dict)")
    state, meta = encoder_for_timm(checkpoint)
    target = Path(str(out)).expanduser()
    if target.suffix != ".safetensors":
        raise ConfigError("out", str(out), "a path ending in .safetensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target), metadata=meta)
    return meta


USAGE = ("usage: python -m mim_lightning.export ckpt=<checkpoint.ckpt> out=<encoder.safetensors>\n\n"
         "Writes the encoder of a pretraining or finetuning checkpoint (a .ckpt file or a trainer=fsdp sharded\n"
         "checkpoint folder): timm-keyed safetensors for ViT and Swin\n"
         "(load with timm.create_model(..., checkpoint_path=out)), the project's own format for the others\n"
         "(load with mim_lightning.export.load_exported(out)). The command prints how to load the file.")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("--help", "-h") for a in argv):
        print(USAGE)
        sys.exit(0)
    args = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    unknown = sorted(set(args) - {"ckpt", "out"})
    if unknown or "ckpt" not in args or "out" not in args:
        fail("usage: python -m mim_lightning.export ckpt=<checkpoint.ckpt> out=<encoder.safetensors>"
             + (f" (unknown keys: {', '.join(unknown)})" if unknown else ""), EXIT_CONFIG_ERROR)
    try:
        meta = export(args["ckpt"], args["out"])
    except ConfigError as error:
        fail(str(error), EXIT_CONFIG_ERROR)
    if meta["format"] == "timm":
        print(f"wrote {args['out']}: timm.create_model({meta['timm_model']!r}, pretrained=False, num_classes=0, "
              f"checkpoint_path={args['out']!r}, **{meta['timm_kwargs']})")
    else:
        print(f"wrote {args['out']}: mim_lightning.export.load_exported({args['out']!r}) rebuilds the "
              f"{meta['family']} encoder ({meta['builder']})")


if __name__ == "__main__":
    main()
