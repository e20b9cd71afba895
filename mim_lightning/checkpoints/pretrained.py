"""Pretrained weights for finetuning: read the encoder of a file (this project's pretraining checkpoint, an
official checkpoint, an exported encoder) and load it into a classifier, resizing position embeddings and relative
position tables for another image size or window.

Differences from the official loaders: the MixMIM/HiViT position embeddings are resized bicubically for another
image size (iTPN's ``interpolate_pos_embed`` is a no-op there); a missing layer scale (``gamma``) or relative
position table that the classifier expects is a one-line error where the official loaders skip it silently
(iTPN#17), except HiViT's tables (absent from pixel checkpoints: zeros, as official).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mim_lightning.errors import ConfigError

if TYPE_CHECKING:
    from mim_lightning.methods.spec import MethodSpec
    from mim_lightning.models.classifiers.base import Classifier


def read_pretrained(path: str | Path, spec: MethodSpec, backbone: Mapping[str, Any] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The encoder weights in ``path``, with the encoder's own (timm) key names.

    ``path`` is a pretraining checkpoint of this project (``.ckpt`` file, or the sharded folder of a
    ``trainer=fsdp`` run: the ``model.encoder.*`` keys; the stored
    checkpoint must be of the same method ``spec``), an official checkpoint of that method (``.pth``,
    converted with the spec's ``convert_official``) or an exported encoder
    (``.safetensors``). A missing file, a checkpoint of another method or (for project checkpoints) of another
    backbone size than ``backbone`` is a one-line :class:`ConfigError`.
    """
    from mim_lightning.checkpoints.official import unwrap_state_dict

    file = Path(str(path)).expanduser()
    if not file.is_file() and not file.is_dir():
        raise ConfigError("pretrained", str(path), "an existing .ckpt, .pth or .safetensors file", "no such file")
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        from mim_lightning.models.backbones.swin import timm_to_swin

        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
        state = dict(load_file(str(file)))
        # exports hold the encoder's own (official) names, except Swin in timm's layout: map it back
        return timm_to_swin(state) if meta.get("format") == "timm" and meta.get("family") == "swin" else state
    try:
        if file.is_dir():  # a sharded (trainer=fsdp) checkpoint folder, read whole on this one process
            from mim_lightning.checkpoints.sharded import is_sharded_checkpoint, load_sharded

            if not is_sharded_checkpoint(file):
                raise ConfigError("pretrained", str(path), "a .ckpt file or a sharded checkpoint folder (trainer=fsdp)",
                                  "a folder without meta.pt and .metadata")
            content = load_sharded(file)
        else:
            content = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise ConfigError("pretrained", str(path), "a checkpoint written by torch.save",
                          f"cannot be read ({type(exc).__name__})") from None
    if not isinstance(content, Mapping):
        raise ConfigError("pretrained", str(path), "a checkpoint holding a state dict", f"holds a {type(content).__name__}")
    if "state_dict" in content and "hyper_parameters" in content:  # a Lightning checkpoint of this project
        from mim_lightning.methods import spec_for_checkpoint

        config = (content.get("hyper_parameters") or {}).get("config") or {}
        stored = spec_for_checkpoint(content, "pretrained")
        if stored.name != spec.name:
            raise ConfigError("pretrained", str(path), f"a {spec.name} pretraining checkpoint",
                              f"it holds a {stored.name} model; pass method={stored.name} (or leave method= out)")
        stored_backbone = config.get("backbone") or {}
        if backbone is not None and stored_backbone:
            sizes = ("family", "patch_size", "embed_dim", "depth", "depths", "num_heads")
            differ = [k for k in sizes if stored_backbone.get(k) != backbone.get(k)]
            if differ:
                raise ConfigError("pretrained", str(path), f"a checkpoint of backbone={backbone.get('name')}",
                                  f"it was pretrained with backbone={stored_backbone.get('name')} ({differ[0]} "
                                  f"{stored_backbone.get(differ[0])} vs {backbone.get(differ[0])}): another size")
        prefix = spec.encoder_prefix
        state = {k[len(prefix):]: v for k, v in content["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise ConfigError("pretrained", str(path), f"a {spec.name} pretraining checkpoint with {prefix}* keys",
                              "no encoder weights found")
        return state
    converted = spec.convert_official(unwrap_state_dict(content))
    return {k[len("encoder."):]: v for k, v in converted.items() if k.startswith("encoder.")}


def _grid_text(tokens: int) -> str:
    side = math.isqrt(max(int(tokens), 0))
    return f"{side}x{side}" if side * side == tokens else f"{tokens} tokens"


def _window_text(rows: int) -> str:
    """The window of a (2w-1)^2-row relative position table."""
    side = math.isqrt(max(int(rows), 0))
    return f"{(side + 1) // 2}x{(side + 1) // 2}" if side * side == rows else f"{rows} rows"


def _names(keys: Sequence[str]) -> str:
    """Parameter names grouped by module (``head``, ``fc_norm``, ``relative_position_bias_table x12``)."""
    groups: dict[str, int] = {}
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        name = leaf if leaf in ("relative_position_bias_table", "relative_position_index", "gamma_1", "gamma_2") \
            else key.split(".", 1)[0]
        groups[name] = groups.get(name, 0) + 1
    return ", ".join(name if count == 1 or not name.startswith("relative") else f"{name} x{count}"
                     for name, count in groups.items())


def load_report_line(report: Mapping[str, Any], path: str | Path) -> str:
    """The one line a finetuning run prints about what :func:`load_encoder` did."""
    parts = [f"{report['loaded']} tensors loaded"]
    if report["resized"]:
        parts.append(f"{len(report['resized'])} resized ({'; '.join(report['resized'])})")
    parts.append(f"{len(report['missing'])} missing" + (f", initialised ({_names(report['missing'])})"
                                                        if report["missing"] else ""))
    parts.append(f"{len(report['unexpected'])} unexpected" + (f", ignored ({_names(report['unexpected'])})"
                                                              if report["unexpected"] else ""))
    return f"pretrained={path}: " + "; ".join(parts)


def load_encoder(classifier: Classifier, state: Mapping[str, torch.Tensor], source: str = "pretrained") -> dict:
    """Load encoder weights into ``classifier.model``: the pos-embed is resized (bicubic) to the model's grid,
    the head and ``fc_norm`` stay as initialized, unused ``norm.*`` weights (global pool) are ignored; any other
    missing key or shape difference is a :class:`ConfigError` naming the key (e.g. a checkpoint of another size).

    Swin-type encoders: keys are mapped to the classifier's names (``key_map``), relative-position-bias tables of
    another window are resized (SimMIM: geometric resampling; MixMIM: bicubic), index buffers recomputed, and a
    fixed ``absolute_pos_embed`` resized bicubically to the new grid. SimMIM ViT: the shared table is copied to
    every block (``key_map``) and resized to the new patch grid with its 3 cls rows kept.

    Returns ``{"loaded": int, "resized": [text], "missing": [keys initialised here], "unexpected": [checkpoint
    keys ignored]}`` (see :func:`load_report_line`)."""
    from mim_lightning.checkpoints.resize import resize_pos_embed, resize_rel_pos_bias

    model = classifier.model
    own = model.state_dict()
    key_map = classifier.key_map
    state = dict(key_map(state) if key_map is not None else state)
    mode = classifier.rel_pos_mode
    resized: list[str] = []
    tables: dict[tuple[int, int], int] = {}
    for key, value in list(state.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        if key.endswith("relative_position_bias_table"):
            extra = int(classifier.rel_pos_extra_rows)  # BEiT-style tables end with 3 cls rows
            window = classifier.grid if extra else (math.isqrt(own[key].shape[0]) + 1) // 2
            state[key] = resize_rel_pos_bias(value, window, mode=mode, num_extra_tokens=extra)
            pair = (int(value.shape[0]) - extra, int(own[key].shape[0]) - extra)
            tables[pair] = tables.get(pair, 0) + 1
        elif key.endswith("relative_position_index"):
            state[key] = own[key]  # recomputed for the new window
        elif key.endswith("absolute_pos_embed") and value.shape[-1] == own[key].shape[-1]:
            state[key] = resize_pos_embed(value, classifier.grid, num_prefix_tokens=0)
            resized.append(f"{key} {_grid_text(value.shape[1])} -> {_grid_text(own[key].shape[1])}")
    for (old, new), count in sorted(tables.items()):
        resized.append(f"relative_position_bias_table x{count} window {_window_text(old)} -> {_window_text(new)}")
    ignored = classifier.ignored_unexpected + ("head.", "fc_norm.")
    unexpected = sorted(k for k in state if k.startswith(ignored))
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        if state["pos_embed"].shape[-1] != own["pos_embed"].shape[-1]:
            raise ConfigError(source, "pos_embed " + str(tuple(state["pos_embed"].shape)),
                              f"an encoder of width {own['pos_embed'].shape[-1]} (the chosen backbone)",
                              "the checkpoint has another embedding width (another size)")
        prefix = own["pos_embed"].shape[1] - classifier.grid[0] * classifier.grid[1]
        resized.append(f"pos_embed {_grid_text(state['pos_embed'].shape[1] - prefix)} -> "
                       f"{classifier.grid[0]}x{classifier.grid[1]}")
        state = {**state, "pos_embed": resize_pos_embed(state["pos_embed"], classifier.grid)}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ConfigError(source, key, f"shape {tuple(own[key].shape)} (the chosen backbone)",
                              f"the checkpoint has {tuple(value.shape)}: a checkpoint of another size")
    result = model.load_state_dict(state, strict=False)
    suffixes = classifier.allowed_missing_suffixes
    missing = [k for k in result.missing_keys
               if not k.startswith(classifier.allowed_missing) and not (suffixes and k.endswith(suffixes))]
    if missing:
        raise ConfigError(source, f"{len(missing)} missing keys, e.g. {missing[0]}",
                          "an encoder with the chosen backbone's keys", "a checkpoint of another size or family")
    if result.unexpected_keys:
        raise ConfigError(source, f"unexpected key {result.unexpected_keys[0]}",
                          "an encoder with the chosen backbone's keys", "a checkpoint of another size or family")
    return {"loaded": len(state), "resized": resized, "missing": sorted(result.missing_keys), "unexpected": unexpected}


def stored_encoder(path: str | Path) -> dict[str, Any] | None:
    """``{"method": name, "backbone": {...}}`` of a pretraining checkpoint of this project (a ``.ckpt`` file or a
    sharded folder), read from what :meth:`PretrainModule.encoder_record` stored (or, for older checkpoints, from
    the stored config); None for any other file (official ``.pth``, ``.safetensors``, unreadable)."""
    file = Path(str(path)).expanduser()
    try:
        if file.is_dir():
            if not (file / "meta.pt").is_file():
                return None
            content = torch.load(file / "meta.pt", map_location="cpu", weights_only=False)
        elif file.is_file() and file.suffix == ".ckpt":
            content = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        else:
            return None
    except Exception:  # noqa: BLE001 - read_pretrained reports unreadable files in one line later
        return None
    if not isinstance(content, Mapping) or "hyper_parameters" not in content:
        return None
    config = (content.get("hyper_parameters") or {}).get("config") or {}
    if "finetune" in config:
        return None
    from mim_lightning.methods import spec_for_checkpoint

    try:
        spec = spec_for_checkpoint(content, "pretrained")
    except ConfigError:
        return None
    record = (content.get("mim_lightning") or {}).get("encoder") or {}
    backbone = record.get("backbone") or config.get("backbone")
    return {"method": spec.name, "backbone": dict(backbone) if backbone else None}
