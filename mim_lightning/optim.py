"""Optimizer parameter groups, the learning-rate scaling rule and per-step schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from mim_lightning.errors import ConfigError


def no_decay_official_mae(name: str, param: torch.Tensor) -> bool:
    """timm 0.3.2 ``add_weight_decay`` as used by MAE/MixMIM/iTPN pretraining: 1-D tensors and
    ``*.bias`` get no weight decay; everything else (including cls/mask tokens) is decayed."""
    return param.ndim <= 1 or name.endswith(".bias")


NO_DECAY_RULES: dict[str, Callable[[str, torch.Tensor], bool]] = {
    "ndim_or_bias": no_decay_official_mae,
}


#: Name segments that wrappers (FSDP, activation checkpointing, torch.compile) insert into parameter names.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter name without the segments FSDP / checkpointing / compile wrappers add."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def no_decay_names(model: nn.Module, rule: str = "ndim_or_bias", skip: Iterable[str] = ()) -> set[str]:
    """Names of the parameters ``rule`` (plus ``skip`` substrings) exempts from weight decay.

    Computed on the unwrapped model: after FSDP flattens and shards parameters every tensor is 1-D,
    so the ``ndim`` rule must be decided before wrapping and looked up by name afterwards.
    """
    if rule not in NO_DECAY_RULES:
        raise ConfigError("method.no_weight_decay", rule, ", ".join(sorted(NO_DECAY_RULES)))
    skip = tuple(skip)
    return {unwrapped_name(name) for name, param in model.named_parameters()
            if NO_DECAY_RULES[rule](name, param) or any(s in name for s in skip)}


def param_groups(model: nn.Module, weight_decay: float, rule: str = "ndim_or_bias",
                 skip: Iterable[str] = (), exempt: set[str] | None = None) -> list[dict]:
    """Two parameter groups, decayed and not, over the trainable parameters of ``model``.

    ``rule`` names an entry of :data:`NO_DECAY_RULES`; ``skip`` adds names (substrings) that are
    never decayed; ``exempt`` (from :func:`no_decay_names`, taken before wrapping) overrides both.
    Frozen parameters (``requires_grad=False``, e.g. fixed sin-cos tables) are left out.
    """
    exempt = no_decay_names(model, rule, skip) if exempt is None else exempt
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if unwrapped_name(name) in exempt:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def scaled_lr(base_lr: float, effective_batch_size: int, base_batch_size: int) -> float:
    """The linear scaling rule ``lr = base_lr * effective_batch / base_batch`` (MAE: /256, SimMIM: /512)."""
    return base_lr * effective_batch_size / base_batch_size


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0,
                         warmup_start_factor: float = 0.0, cosine_from_start: bool = False) -> float:
    """LR multiplier at optimizer step ``step``: linear warm-up from ``warmup_start_factor`` to 1 over
    ``warmup_steps``, then a half-cycle cosine down to ``min_factor`` at ``total_steps``.

    Per-step version of ``mae:util/lr_sched.py adjust_learning_rate`` (the first step uses lr 0 when
    ``warmup_start_factor`` is 0, as the official code does). With ``cosine_from_start`` the cosine is
    a function of the absolute step (``step / total_steps``), as timm's ``CosineLRScheduler`` with
    ``warmup_prefix=False`` that SimMIM uses: the lr is already slightly below the peak when warm-up ends.
    """
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    if cosine_from_start:
        progress = min(1.0, step / max(1, total_steps))
    else:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_multistep_factor(step: int, warmup_steps: int, milestones: list[int] | tuple[int, ...], gamma: float = 0.1,
                            warmup_start_factor: float = 0.0) -> float:
    """LR multiplier: linear warm-up as :func:`warmup_cosine_factor`, then ``gamma ** (milestones passed)``.

    The per-step equivalent of timm's ``MultiStepLRScheduler`` with ``t_in_epochs=False``, as SimMIM's
    800-epoch recipe uses it (x0.1 at epoch 700).
    """
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    return gamma ** sum(step >= milestone for milestone in milestones)


def layer_decay_param_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                             layer_id: Callable[[str], int], num_layers: int,
                             no_weight_decay: Iterable[str] = (), one_dim: set[str] | None = None) -> list[dict]:
    """Parameter groups with layer-wise lr decay, as ``mae:util/lr_decay.py param_groups_lrd``.

    A parameter of layer ``layer_id(name)`` gets ``lr_scale = layer_decay ** (num_layers - layer_id)``
    (the head, at ``num_layers``, gets 1). 1-D parameters and the names in ``no_weight_decay`` (exact
    names, e.g. timm's ``pos_embed``/``cls_token``) get no weight decay. Frozen parameters are left out.
    Each group carries ``lr_scale``, ``layer_id`` and ``weight_decay``; multiply the lr by ``lr_scale``.
    ``one_dim`` (names of the 1-D parameters, taken before a strategy such as FSDP flattens them) replaces
    the ``ndim`` test; names are compared without wrapper segments (:func:`unwrapped_name`).
    """
    skip = set(no_weight_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for wrapped, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = unwrapped_name(wrapped)
        flat = param.ndim == 1 if one_dim is None else name in one_dim
        no_decay = flat or name in skip
        lid = int(layer_id(name))
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": float(layer_decay) ** (num_layers - lid), "layer_id": lid,
                           "name": f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(wrapped)
    return [groups[key] for key in sorted(groups)]


# ------------------------------------------------------------------------------------------------ speed
#: Optimizers whose PyTorch implementation has a fused CUDA kernel (one launch for all parameters).
FUSED_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam)


def optimizer_class(factory: Callable[..., torch.optim.Optimizer] | type) -> type | None:
    """The optimizer class behind ``factory`` (a class or a ``functools.partial`` of one, as Hydra's
    ``_partial_: true`` makes), or None when it is something else."""
    while isinstance(factory, partial):
        factory = factory.func
    return factory if isinstance(factory, type) else None


def device_optimizer_kwargs(factory: Callable[..., torch.optim.Optimizer] | type, device: torch.device | str) -> dict:
    """Extra constructor arguments for ``factory`` on ``device``: ``fused=True`` for AdamW/Adam on CUDA
    (one kernel for every parameter instead of a ``foreach`` loop; PyTorch's default is ``foreach``), and
    nothing on the CPU or for other optimizers. An explicit ``fused`` or ``foreach`` in the optimizer
    config (``method.optimizer.foreach=true``) is left alone."""
    cls = optimizer_class(factory)
    keywords = factory.keywords if isinstance(factory, partial) else {}
    if torch.device(device).type != "cuda" or cls is None or not issubclass(cls, FUSED_OPTIMIZERS):
        return {}
    if keywords.get("fused") is not None or keywords.get("foreach") is not None:
        return {}
    return {"fused": True}


def make_optimizer(factory: Callable[..., torch.optim.Optimizer], groups: list[dict], lr: float,
                   device: torch.device | str) -> torch.optim.Optimizer:
    """``factory(groups, lr=lr)`` with :func:`device_optimizer_kwargs` for ``device`` (fused AdamW on CUDA)."""
    return factory(groups, lr=lr, **device_optimizer_kwargs(factory, device))


def compile_in_place(model: nn.Module, enabled: bool, kwargs: dict | None = None) -> nn.Module:
    """``model.compile(**kwargs)`` when ``enabled`` (the ``compile`` config key): ``torch.compile`` applied
    in place (``nn.Module.compile``), so ``state_dict`` keys stay those of the plain model (no
    ``_orig_mod.``) and checkpoints load with or without compilation. ``kwargs`` are ``torch.compile``'s
    (``backend``, ``mode``, ``dynamic``, ``fullgraph``, ``options``); None values are dropped.
    Compilation happens at the first call. Returns ``model``."""
    if enabled:
        model.compile(**{key: value for key, value in dict(kwargs or {}).items() if value is not None})
    return model

