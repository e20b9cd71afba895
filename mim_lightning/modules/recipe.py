"""The training recipe both LightningModules share: the learning rate and its schedule, and the non-finite policy.

:class:`LearningRateRecipe`: the effective batch (per-device batch x data-parallel ranks x accumulation), the linear
scaling rule ``lr = base * effective_batch / base_batch_size`` (or an absolute ``value``), a per-optimizer-step
schedule (linear warm-up from ``warmup_start`` over ``warmup_epochs``/``warmup_steps``, then a half-cycle cosine to
``min`` or a multistep decay) as a ``LambdaLR``, and ``train/lr`` logging without a host-device copy.

:class:`NonFinitePolicy`: ``on_nonfinite=stop`` tests the loss and the gradient norm on the device every step and
reads the flag (one host-device sync) every ``nonfinite_check_every_n_steps`` steps, before every checkpoint and at
the end of each epoch, raising :class:`~mim_lightning.errors.NonFiniteLossError` that names the first bad step;
``skip`` drops such steps (counted in ``train/skipped_steps``; a skipped step logs no ``train/loss`` or
``train/grad_norm``), which needs a sync every step, and stops when the weights themselves are no longer finite
(checked when a step is skipped and before every checkpoint). Both log ``train/grad_norm``.

A module mixing them in sets ``lr_config``, ``batch_size``, ``lr_key`` (the config key its errors name, e.g.
``method.lr``) and ``model`` (whose gradients are checked), and calls :meth:`NonFinitePolicy.init_nonfinite`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from mim_lightning.errors import ConfigError, NonFiniteLossError
from mim_lightning.optim import scaled_lr, warmup_cosine_factor, warmup_multistep_factor

#: The keys of an lr recipe and their defaults (each module's yaml states its method's values).
LR_DEFAULTS = {
    "base": 1.5e-4, "base_batch_size": 256, "value": None, "min": 0.0, "warmup_epochs": 40.0, "warmup_steps": None,
    "warmup_start": 0.0, "scale_min_and_warmup": False, "schedule": "cosine", "milestones_epochs": (),
    "gamma": 0.1, "cosine_from": "warmup_end",
}
SCHEDULES = ("cosine", "multistep")
COSINE_ORIGINS = ("warmup_end", "start")
NONFINITE_POLICIES = ("stop", "skip")
#: What a recorded non-finite value was (index stored on the device).
NONFINITE_KINDS = ("training loss", "gradient norm")
_NO_STEP = torch.iinfo(torch.long).max
#: The hooks whose per-step metrics a skipped step must not log again with the values of an earlier step.
STEP_HOOKS = ("training_step", "on_before_optimizer_step")


def lr_recipe(lr: Any, defaults: dict[str, Any], key: str) -> dict[str, Any]:
    """``defaults`` updated with ``lr``, its schedule names checked (one-line errors naming ``key``)."""
    config = {**defaults, **dict(lr or {})}
    if config["schedule"] not in SCHEDULES:
        raise ConfigError(f"{key}.schedule", config["schedule"], ", ".join(SCHEDULES))
    if config["cosine_from"] not in COSINE_ORIGINS:
        raise ConfigError(f"{key}.cosine_from", config["cosine_from"], ", ".join(COSINE_ORIGINS))
    return config


class LearningRateRecipe:
    """The lr rule and schedule of a LightningModule (see the module docstring)."""

    lr_config: dict[str, Any]
    batch_size: int
    lr_key: str = "method.lr"

    def effective_batch_size(self) -> int:
        from mim_lightning.parallel import data_parallel_size

        trainer = self.trainer
        return self.batch_size * data_parallel_size(trainer) * int(trainer.accumulate_grad_batches)

    def batch_factor(self) -> float:
        """``effective_batch / base_batch_size``: the factor of the linear scaling rule."""
        return self.effective_batch_size() / int(self.lr_config["base_batch_size"])

    def learning_rate(self) -> float:
        if self.lr_config["value"] is not None:
            return float(self.lr_config["value"])
        return scaled_lr(float(self.lr_config["base"]), self.effective_batch_size(),
                         int(self.lr_config["base_batch_size"]))

    def min_and_warmup_start_lr(self) -> tuple[float, float]:
        scaled = self.lr_config["scale_min_and_warmup"] and self.lr_config["value"] is None
        scale = self.batch_factor() if scaled else 1.0
        return float(self.lr_config["min"]) * scale, float(self.lr_config["warmup_start"]) * scale

    def steps_per_epoch(self) -> int:
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            raise ConfigError(f"{self.lr_key}.warmup_epochs", self.lr_config["warmup_epochs"],
                              f"{self.lr_key}.warmup_steps for data without a known epoch length")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def schedule_steps(self) -> tuple[int, int]:
        """(warm-up steps, total optimizer steps) for the per-step schedule."""
        total = int(self.trainer.estimated_stepping_batches)
        if self.lr_config["warmup_steps"] is not None:
            warmup = int(self.lr_config["warmup_steps"])
        else:
            warmup = int(round(float(self.lr_config["warmup_epochs"]) * self.steps_per_epoch()))
        return min(warmup, total), total

    def lr_scheduler(self, optimizer: torch.optim.Optimizer, lr: float) -> dict[str, Any]:
        """The per-step ``LambdaLR`` of the recipe, in Lightning's scheduler format."""
        warmup, total = self.schedule_steps()
        min_lr, start_lr = self.min_and_warmup_start_lr()
        start_factor = start_lr / lr if lr > 0 else 0.0
        if self.lr_config["schedule"] == "multistep":
            milestones = [int(round(float(e) * self.steps_per_epoch())) for e in self.lr_config["milestones_epochs"]]
            schedule = partial(warmup_multistep_factor, warmup_steps=warmup, milestones=milestones,
                               gamma=float(self.lr_config["gamma"]), warmup_start_factor=start_factor)
        else:
            schedule = partial(warmup_cosine_factor, warmup_steps=warmup, total_steps=total,
                               min_factor=min_lr / lr if lr > 0 else 0.0, warmup_start_factor=start_factor,
                               cosine_from_start=self.lr_config["cosine_from"] == "start")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"scheduler": scheduler, "interval": "step", "frequency": 1}

    def log_lr(self, batch_size: int, prog_bar: bool = False) -> None:
        """``train/lr``: the largest lr of the param groups (the top layer's under layer decay), as a host tensor
        (Lightning would copy a Python float to the device with a blocking copy every step)."""
        lr = max(float(group["lr"]) for group in self.optimizers().param_groups)
        self.log("train/lr", torch.tensor(lr), prog_bar=prog_bar, batch_size=batch_size)


class NonFinitePolicy:
    """``on_nonfinite`` with the device-side flag (see the module docstring)."""

    model: torch.nn.Module
    lr_key: str = "method.lr"

    def init_nonfinite(self, on_nonfinite: str, every: Any) -> None:
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError("on_nonfinite", on_nonfinite, ", ".join(NONFINITE_POLICIES))
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError("nonfinite_check_every_n_steps", every,
                              "a positive integer (1 reads the flag before every optimizer step)")
        self.on_nonfinite = on_nonfinite
        self.nonfinite_check_every_n_steps = every
        # (step, kind, value) of the first non-finite loss / gradient norm, on the device; step -1 = none yet
        self._first_nonfinite: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.skipped_steps = 0

    def _all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (one host sync; ranks must agree to skip together)."""
        finite = torch.isfinite(value.detach()).all().float()
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return bool(finite.item())

    def _skip(self) -> None:
        """Count a dropped step, forget the last per-step values of the training step and the gradient norm
        (``train/loss``, its terms, ``finetune/train_loss``, ``train/lr``, ``train/grad_norm``: Lightning would log
        them again for this step) and stop if the weights are no longer finite."""
        self.skipped_steps += 1
        self.log("train/skipped_steps", torch.tensor(float(self.skipped_steps)))
        results = getattr(self.trainer, "_results", None)
        for item in (results.values() if results is not None else ()):
            meta = item.meta
            if meta.fx in STEP_HOOKS and meta.on_step and not meta.on_epoch and meta.name != "train/skipped_steps":
                item.reset()  # not logged again until the next self.log of it
        self.check_weights_finite()

    def check_weights_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a parameter holds NaN/inf on any rank (one host sync; called when a
        step is skipped and before every checkpoint): ``on_nonfinite=skip`` cannot save a diverged run."""
        params = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in self.model.named_parameters()]
        params = [(name, p) for name, p in params if p.numel() and p.is_floating_point()]
        if not params:
            return
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params])
        bad = (~finite).sum().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad.item()) == 0:
            return
        mine = [name for (name, _), ok in zip(params, finite.tolist()) if not ok]
        first = f", first {mine[0]}" if mine else " (on another rank)"
        raise NonFiniteLossError(
            f"the weights are no longer finite at step {self.global_step} ({int(bad.item())} parameter tensors hold "
            f"NaN/inf{first}; {self.skipped_steps} steps skipped so far): training diverged and no checkpoint is "
            f"written from here. Lower {self.lr_key}.base, set trainer.gradient_clip_val or use bf16 instead of fp16.")

    def keep_step(self, loss: torch.Tensor) -> bool:
        """Whether the training step goes on with ``loss``: ``skip`` drops a non-finite one (the step returns None,
        so Lightning skips backward and the update); ``stop`` records it on the device (read later)."""
        if self.on_nonfinite == "skip":
            if not self._all_finite(loss):
                self._skip()
                return False
        else:
            self.record_nonfinite(0, loss)
        return True

    def record_nonfinite(self, kind: int, value: torch.Tensor) -> None:
        """Remember, on the device and without a sync, the first step at which ``value`` (a scalar; ``kind``
        indexes :data:`NONFINITE_KINDS`) is NaN/inf. :meth:`check_nonfinite` reads it."""
        value = value.detach().float().reshape(())
        if self._first_nonfinite is None or self._first_nonfinite[0].device != value.device:
            self._first_nonfinite = (torch.full((), -1, dtype=torch.long, device=value.device),
                                     torch.zeros((), dtype=torch.long, device=value.device),
                                     torch.zeros((), device=value.device))
        step, which, seen = self._first_nonfinite
        new = ~torch.isfinite(value) & (step < 0)
        self._first_nonfinite = (torch.where(new, self.global_step, step), torch.where(new, kind, which),
                                 torch.where(new, value, seen))

    def check_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a recorded step had a non-finite loss or gradient norm on any
        rank (one host sync; every rank calls this at the same points)."""
        if self._first_nonfinite is None:
            return
        step, which, seen = self._first_nonfinite
        first = torch.where(step >= 0, step, torch.full_like(step, _NO_STEP))
        if self._trainer is not None and self.trainer.world_size > 1:
            first = self.trainer.strategy.reduce(first, reduce_op="min")
        first_step = int(first.item())
        if first_step == _NO_STEP:
            return
        mine = int(step.item()) == first_step
        what = NONFINITE_KINDS[int(which.item())] if mine else "loss or gradient norm (on another rank)"
        shown = seen.item() if mine else "nan/inf"
        if first_step == self.global_step:
            where = f"at step {first_step}, epoch {self.current_epoch}; stopping before the optimizer step"
        else:
            where = (f"at step {first_step}; found at step {self.global_step} (on_nonfinite=stop reads the flag "
                     f"every {self.nonfinite_check_every_n_steps} steps and before every checkpoint)")
        raise NonFiniteLossError(
            f"non-finite {what} ({shown}) {where}; no checkpoint holds weights from that step on. Lower "
            f"{self.lr_key}.base, set trainer.gradient_clip_val, use bf16 instead of fp16, or on_nonfinite=skip.")

    def gradient_norm(self) -> torch.Tensor | None:
        """The total 2-norm of the model's gradients (``train/grad_norm``), None before any backward."""
        from mim_lightning.parallel import full_tensor

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # FSDP2: the norm of the sharded gradients is a DTensor; its full value is the same on every rank
        return full_tensor(torch.nn.utils.get_total_norm(grads)) if grads else None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm = self.gradient_norm()
        # fp16 loss scaling produces inf gradients by design; its scaler skips those steps itself.
        checked = norm is not None and not str(self.trainer.precision).startswith("16")
        if self.on_nonfinite == "skip":
            if checked and not self._all_finite(norm):
                self._skip()
                optimizer.zero_grad(set_to_none=True)  # params without grads are not updated
                return
        else:
            if checked:
                self.record_nonfinite(1, norm)
            if (self.global_step + 1) % self.nonfinite_check_every_n_steps == 0:
                self.check_nonfinite()
        if norm is not None:
            self.log("train/grad_norm", norm)

    def on_train_epoch_end(self) -> None:
        self.check_nonfinite()

    def on_train_end(self) -> None:
        self.check_nonfinite()
