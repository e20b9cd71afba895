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

def _classifier_export(config: Mapping[str, Any]):
    """The export function of a finetuning checkpoint's classifier builder (``finetune.classifier._target_``)."""
    from hydra.utils import get_class

    target = ((config.get("finetune") or {}).get("classifier") or {})
    target = target.get("_target_") if isinstance(target, Mapping) else None
    try:
        builder = get_class(str(target)) if target else None
    except Exception:  # noqa: BLE001 - a class that no longer exists has no export either
        builder = None
    export_fn = getattr(builder, "export", None)
    if export_fn is None:
        raise ConfigError("ckpt", f"a finetuning checkpoint of {target or 'an older classifier'}",
                          "a finetuning checkpoint of a ViT classifier (MAE, SimMIM-ViT), or the pretraining "
                          "checkpoint of the encoder", "no export for this classifier")
    return export_fn


def encoder_for_timm(checkpoint: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict to write, metadata) of a Lightning checkpoint of this project: a pretraining checkpoint through
    its method's spec (``MethodSpec.export``), a finetuning checkpoint through its classifier builder's export."""
    from mim_lightning.methods import spec_for_checkpoint

    config = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
    state = checkpoint["state_dict"]
    if "finetune" in config:  # a finetuning checkpoint: the classifier without its head
        export_fn = _classifier_export(config)
        encoder = {k[len("model."):]: v for k, v in state.items()
                   if k.startswith("model.") and not k.startswith("model.head")}
        return export_fn(encoder, config)
    spec = spec_for_checkpoint(checkpoint)
    encoder = {k[len(spec.encoder_prefix):]: v for k, v in state.items() if k.startswith(spec.encoder_prefix)}
    return spec.export(encoder, config)


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
        from mim_lightning.checkpoints.sharded import is_sharded_checkpoint, load_sharded

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
