"""The finetuning / linear-probing LightningModule, and how a composed ``conf/finetune.yaml`` builds it.

``build_finetune_module(cfg)`` instantiates ``cfg.finetune`` (its ``_target_`` is :class:`FinetuneModule`, its
``classifier._target_`` the method's classifier builder from :mod:`mim_lightning.models.classifiers`), then loads
``cfg.pretrained`` into the classifier's encoder (:mod:`mim_lightning.checkpoints.pretrained`, through the method's
spec). Linear probing (``mode=linear_probe``) freezes everything but ``BatchNorm1d(D, affine=False, eps=1e-6)`` +
Linear (``mae:main_linprobe.py``) on the recipe's probe feature. EMA of weights is
:class:`mim_lightning.callbacks.ema.EMA` or Lightning's ``EMAWeightAveraging``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch import nn

from mim_lightning import runlog
from mim_lightning.errors import ConfigError
from mim_lightning.modules.recipe import LR_DEFAULTS, LearningRateRecipe, NonFinitePolicy, lr_recipe
from mim_lightning.optim import layer_decay_param_groups, make_optimizer, unwrapped_name

if TYPE_CHECKING:
    from mim_lightning.models.classifiers.base import ClassifierBuilder

MODES = ("finetune", "linear_probe")
#: MAE finetuning's values, where a recipe leaves a key out.
DEFAULT_LR = {**LR_DEFAULTS, "base": 5e-4, "min": 1e-6, "warmup_epochs": 5.0}


class FinetuneModule(LearningRateRecipe, NonFinitePolicy, pl.LightningModule):
    """Supervised training of a classifier from a pretrained encoder.

    Args:
        classifier: the method's classifier builder (``finetune.classifier``, :mod:`mim_lightning.models.classifiers`);
            its ``build(num_classes, probe)`` gives the model (``model(images) -> logits``), its layer-id map
            (a parameter of layer ``i`` gets ``lr_scale = layer_decay ** (num_layers - i)``) and no-decay rules.
        num_classes: number of classes (top-5 is logged only with more than 5 classes).
        mode: ``finetune`` (all weights; layer-wise lr decay) or ``linear_probe`` (head only; ``linear_probe``'s
            ``feature``, ``block``, ``head_init_std``, ``optimizer``, ``weight_decay`` and ``lr`` replace the
            finetuning ones).
        method: the pretraining method whose encoder is finetuned (recorded with the run).
        layer_decay: the decay (1.0 = off).
        optimizer: a partial optimizer taking param groups and ``lr``, or ``"lars"`` (timm ``Lars``, momentum
            0.9, trust 0.001; 1-D parameters neither decayed nor adapted, as ``mae:util/lars.py``).
        weight_decay, no_weight_decay: decay of the decayed group; names never decayed (besides 1-D params).
        lr: ``base`` per ``base_batch_size`` (or absolute ``value``), ``min``, ``warmup_epochs``/``warmup_steps``,
            ``warmup_start``; per-step linear warm-up then half-cycle cosine (``mae:util/lr_sched.py``);
            ``scale_min_and_warmup`` scales ``min`` and ``warmup_start`` by the batch factor and ``cosine_from: start``
            runs the cosine over the absolute step (SimMIM's timm ``CosineLRScheduler``).
        mixup, cutmix, mixup_prob, mixup_switch_prob, mixup_mode, smoothing: timm ``Mixup`` (label smoothing
            folded into the soft targets, ``SoftTargetCrossEntropy``); without mixing, label smoothing CE.
        augment: the train transform recipe (timm ``create_transform`` arguments; the DataModule reads it).
        batch_size: per-device batch (for the lr rule); config: the resolved run config (kept in checkpoints).
        on_nonfinite: ``stop`` (a NaN/inf loss raises ``NonFiniteLossError`` naming the step) or ``skip`` (the
            step is dropped and counted in ``train/skipped_steps``).

    Logs ``finetune/train_loss``, ``train/lr``, ``finetune/val_loss``, ``finetune/val_top1``, ``finetune/val_top5``
    (more than 5 classes). Held-out items marked ``valid: False`` (an unreadable image's stand-in) are left out of
    the validation metrics. At the end of fitting the last and best ``finetune/val_top1`` are printed.
    """

    def __init__(self, classifier: ClassifierBuilder, num_classes: int, mode: str = "finetune",
                 method: str | None = None, layer_decay: float = 1.0,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None, weight_decay: float = 0.05,
                 no_weight_decay_keys: Sequence[str] = (), lr: Mapping[str, Any] | None = None, mixup: float = 0.0,
                 cutmix: float = 0.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5, mixup_mode: str = "batch",
                 smoothing: float = 0.0, augment: Mapping[str, Any] | None = None,
                 linear_probe: Mapping[str, Any] | None = None, batch_size: int = 64,
                 config: Mapping[str, Any] | None = None, on_nonfinite: str = "stop",
                 nonfinite_check_every_n_steps: int = 50) -> None:
        super().__init__()
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from torchmetrics.classification import MulticlassAccuracy

        if mode not in MODES:
            raise ConfigError("mode", mode, ", ".join(MODES))
        probe = dict(linear_probe or {}) if mode == "linear_probe" else None
        self.method = method
        self.augment = dict(augment or {})  # the train transform recipe (read by the DataModule), kept with the run
        self.classifier = classifier.build(int(num_classes), probe)
        model = self.classifier.model
        if probe is not None:  # the encoder is frozen, only the head trains
            for param in model.parameters():
                param.requires_grad = False
            for param in self.classifier.head.parameters():
                param.requires_grad = True
            optimizer = probe.get("optimizer", "lars")
            weight_decay, lr, layer_decay = float(probe.get("weight_decay", 0.0)), probe.get("lr"), 1.0
        else:
            layer_decay = float(layer_decay) ** self.classifier.decay_power
        self.model = model
        # decided before a strategy (FSDP) flattens every parameter to 1-D
        self._one_dim = {unwrapped_name(n) for n, p in model.named_parameters() if p.ndim <= 1}
        self.num_classes = int(num_classes)
        self.mode = mode
        self.lr_key = "finetune.lr" if probe is None else "finetune.linear_probe.lr"
        self.init_nonfinite(on_nonfinite, nonfinite_check_every_n_steps)
        self.layer_id = self.classifier.layer_id
        self.num_layers = int(self.classifier.num_layers)
        self.layer_decay = float(layer_decay)
        self.optimizer_factory = optimizer if optimizer is not None else partial(torch.optim.AdamW, betas=(0.9, 0.999))
        self.weight_decay = float(weight_decay)
        self.no_weight_decay = tuple(self.classifier.no_weight_decay)
        self.lr_config = lr_recipe(lr, DEFAULT_LR, self.lr_key)
        self.batch_size = int(batch_size)
        self.mixup_fn = None
        if (mixup > 0 or cutmix > 0) and mode == "finetune":
            if self.batch_size % 2:
                raise ConfigError("data.batch_size", batch_size, "an even number with Mixup/CutMix",
                                  "timm Mixup pairs the images of a batch")
            self.mixup_fn = Mixup(mixup_alpha=float(mixup), cutmix_alpha=float(cutmix), prob=float(mixup_prob),
                                  switch_prob=float(mixup_switch_prob), mode=mixup_mode,
                                  label_smoothing=float(smoothing), num_classes=self.num_classes)
            self.train_criterion: nn.Module = SoftTargetCrossEntropy()
        elif smoothing > 0 and mode == "finetune":
            self.train_criterion = LabelSmoothingCrossEntropy(smoothing=float(smoothing))
        else:
            self.train_criterion = nn.CrossEntropyLoss()
        self.no_weight_decay_keys = (*self.classifier.no_weight_decay_keys, *[str(k) for k in no_weight_decay_keys])
        self.top1 = MulticlassAccuracy(num_classes=self.num_classes, top_k=1, average="micro")
        # top-k only where it can miss: with k >= num_classes every prediction is a top-k hit
        self.top5 = (MulticlassAccuracy(num_classes=self.num_classes, top_k=5, average="micro")
                     if self.num_classes > 5 else None)
        self.val_top1_history: list[tuple[int, float]] = []
        self.save_hyperparameters(ignore=["classifier", "optimizer"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` shard the classifier with FSDP2 (one unit per block; :mod:`mim_lightning.parallel`);
        nothing under other strategies. Layer-decay groups use the names taken before sharding (unchanged by FSDP2)."""
        from mim_lightning.parallel import shard_module

        shard_module(self)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["images"], batch["label"]
        targets = labels
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, labels)
        loss = self.train_criterion(self.model(images), targets)
        if not self.keep_step(loss):
            return None  # on_nonfinite=skip: Lightning skips backward and the optimizer step
        self.log("finetune/train_loss", loss.detach(), prog_bar=True, batch_size=images.shape[0])
        self.log_lr(images.shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(batch["images"])
        labels = batch["label"]
        valid = batch.get("valid")
        if valid is not None and not bool(valid.all()):  # stand-ins for unreadable images: not scored
            logits, labels = logits[valid], labels[valid]
        size = labels.shape[0]
        if size == 0:
            return
        self.top1(logits, labels)
        self.log("finetune/val_loss", nn.functional.cross_entropy(logits, labels), sync_dist=True, batch_size=size)
        self.log("finetune/val_top1", self.top1, prog_bar=True, batch_size=size)
        if self.top5 is not None:
            self.top5(logits, labels)
            self.log("finetune/val_top5", self.top5, batch_size=size)

    def on_validation_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        value = self.trainer.callback_metrics.get("finetune/val_top1")
        if value is not None:
            self.val_top1_history.append((int(self.current_epoch), float(value)))

    def on_fit_end(self) -> None:
        """One line with the last and the best validation top-1 of the run (rank 0)."""
        if not self.val_top1_history:
            return
        epoch, last = self.val_top1_history[-1]
        best_epoch, best = max(self.val_top1_history, key=lambda item: (item[1], -item[0]))
        runlog.info(f"{self.mode}: finetune/val_top1 final {last:.4f} (epoch {epoch}), best {best:.4f} "
                    f"(epoch {best_epoch})")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_nonfinite()  # never write weights that went through a non-finite step
        self.check_weights_finite()
        state = checkpoint.setdefault("mim_lightning", {})
        state["val_top1_history"] = list(self.val_top1_history)
        state["skipped_steps"] = self.skipped_steps
        state["num_classes"] = self.num_classes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mim_lightning") or {}
        stored = state.get("num_classes", (checkpoint.get("hyper_parameters") or {}).get("num_classes"))
        if stored is not None and int(stored) != self.num_classes:  # before Lightning loads the head's weights
            raise ConfigError("num_classes", self.num_classes, f"{stored}, the class count of the run resumed "
                              "(or a new run_dir for another class list)",
                              f"the checkpoint's head has {stored} classes, this run {self.num_classes}")
        self.val_top1_history = [(int(e), float(v)) for e, v in state.get("val_top1_history") or []]
        self.skipped_steps = int(state.get("skipped_steps", 0))

    # ------------------------------------------------------------------ optimizer
    def param_groups(self, lr: float) -> list[dict]:
        if self.optimizer_factory == "lars":
            named = [(unwrapped_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
            decay = [p for n, p in named if n not in self._one_dim]
            flat = [p for n, p in named if n in self._one_dim]
            groups = [{"params": decay, "weight_decay": self.weight_decay, "always_adapt": True, "lr_scale": 1.0},
                      {"params": flat, "weight_decay": 0.0, "always_adapt": False, "lr_scale": 1.0}]
            groups = [g for g in groups if g["params"]]
        else:
            skip = [unwrapped_name(n) for n, _ in self.model.named_parameters()
                    if any(k in n for k in self.no_weight_decay_keys)]
            groups = layer_decay_param_groups(self.model, self.weight_decay, self.layer_decay, self.layer_id,
                                              self.num_layers, [*self.no_weight_decay, *skip], one_dim=self._one_dim)
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
        return groups

    def configure_optimizers(self):
        lr = self.learning_rate()
        groups = self.param_groups(lr)
        if self.optimizer_factory == "lars":
            from timm.optim import Lars

            optimizer = Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)
        elif callable(self.optimizer_factory):
            from mim_lightning.parallel import optimizer_device

            optimizer = make_optimizer(self.optimizer_factory, groups, lr, optimizer_device(self))  # fused AdamW on CUDA
        else:
            raise ConfigError("finetune.optimizer", self.optimizer_factory, "lars or an optimizer _target_ (AdamW)")
        scheduler = self.lr_scheduler(optimizer, lr)
        warmup, total = self.schedule_steps()
        rank_zero_info(f"[mim_lightning] {self.mode}: effective batch {self.effective_batch_size()}; lr {lr:.3g}; "
                       f"layer decay {self.layer_decay}; warm-up {warmup} of {total} optimizer steps")
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


# --------------------------------------------------------------------------- from a composed config


def check_num_classes(given: Any, found: int | None = None) -> None:
    """``num_classes`` is an integer >= 2 and, when the class folders are known, their count (``found``)."""
    if isinstance(given, bool) or not isinstance(given, int) or given < 2:
        raise ConfigError("num_classes", given, "null (the number of class sub-folders) or an integer >= 2",
                          "a classifier needs at least 2 classes")
    if found is not None and given != found:
        raise ConfigError("num_classes", given, f"null or {found}", f"data.root has {found} class sub-folders "
                          "(the labels are their indices)")


def count_classes(cfg: DictConfig) -> int:
    """``num_classes``, or the number of class sub-folders of the labelled source."""
    if cfg.get("num_classes") is not None:
        check_num_classes(cfg.num_classes)
        return int(cfg.num_classes)
    from mim_lightning.data.classification import labelled_source

    names = labelled_source(cfg).class_names()
    if len(names) < 2:
        raise ConfigError("data.root", cfg.data.get("root"), "a folder with a sub-folder per class (two or more)",
                          f"found {len(names)} class sub-folders")
    return len(names)


def build_finetune_module(cfg: DictConfig, num_classes: int | None = None) -> FinetuneModule:
    """The finetuning (or linear-probing, ``cfg.mode``) module of a composed ``conf/finetune.yaml``, with
    ``cfg.pretrained`` loaded into its encoder."""
    from mim_lightning.checkpoints.pretrained import load_encoder, load_report_line, read_pretrained
    from mim_lightning.instantiate import instantiate_checked, to_container
    from mim_lightning.methods import spec_named

    mode = str(cfg.get("mode", "finetune"))
    if mode not in MODES:
        raise ConfigError("mode", mode, ", ".join(MODES))
    spec = spec_named(cfg.finetune.method, "method")
    num_classes = count_classes(cfg) if num_classes is None else int(num_classes)
    factory = instantiate_checked(cfg.finetune, _partial_=True, _convert_="all")
    try:
        module = factory(num_classes=num_classes, mode=mode, config=to_container(cfg),
                         on_nonfinite=str(cfg.get("on_nonfinite", "stop")),
                         nonfinite_check_every_n_steps=cfg.get("nonfinite_check_every_n_steps", 50))
    except Exception as exc:  # noqa: BLE001 - a bad recipe value is one line
        from mim_lightning.instantiate import as_config_error

        error = as_config_error(exc)
        if error is not None:
            raise error from None
        raise
    if cfg.get("pretrained"):
        state = read_pretrained(cfg.pretrained, spec, backbone=cfg.backbone)
        runlog.info(load_report_line(load_encoder(module.classifier, state), cfg.pretrained))
    return module
