"""What the small-scale study runs: the methods and their small encoders, the budget, the overrides of each run
and the finetune-budget selection."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Small encoders for 32px images (a few hundred thousand parameters each).
VIT = ["backbone=vit_micro", "backbone.name=vit_fmnist", "backbone.patch_size=4", "backbone.embed_dim=96",
       "backbone.depth=4", "backbone.num_heads=3", "backbone.decoder.dim=64", "backbone.decoder.depth=2",
       "backbone.decoder.heads=2"]
# Three stages at 16/8/4 tokens (2px patches): the total stride 8 (backbone.stride, derived) gives a 4x4 grid of
# mask units.
SWIN = ["backbone=swin_test", "backbone.name=swin_fmnist", "backbone.patch_size=2", "backbone.embed_dim=48",
        "backbone.depths=[1,2,1]", "backbone.num_heads=[2,4,8]", "backbone.decoder.dim=64",
        "backbone.decoder.depth=2", "backbone.decoder.heads=2"]
# 4px units (8x8) with the two MLP stems at 1px and 2px.
HIVIT = ["backbone=hivit_test", "backbone.name=hivit_fmnist", "backbone.patch_size=4", "backbone.embed_dim=96",
         "backbone.depth=4", "backbone.num_heads=3", "backbone.fpn_dim=32", "backbone.decoder.dim=64",
         "backbone.decoder.depth=2", "backbone.decoder.heads=2"]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    backbone: list[str]
    pretrain: list[str] = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    #: The encoder family, the unit of the finetune-budget selection (one budget per family).
    family: str = ""


METHODS = {
    "mae": Method("mae", "MAE", VIT, ["mask.ratio=0.75"], family="vit"),
    "simmim": Method("simmim", "SimMIM", SWIN, ["method.model.window_size=4", "mask.unit=8", "mask.ratio=0.6"],
                     ["finetune.classifier.window_size=4"], family="swin"),
    "mixmae": Method("mixmae", "MixMAE", SWIN, ["method.model.window_size=[8,8,4]"],
                     ["finetune.classifier.window_size=[8,8,4]"], family="swin"),
    "itpn": Method("itpn", "iTPN-pixel", HIVIT, ["mask.ratio=0.75"], family="hivit"),
}
#: The classifier each family's budget is selected with (fixed, so that the choice does not depend on which
#: methods one invocation runs).
SELECTION_METHOD = {"vit": "mae", "swin": "simmim", "hivit": "itpn"}


@dataclass
class Budget:
    """Epochs and data fractions of one reproduction."""

    seeds: list[int]
    pretrain_epochs: int = 4
    pretrain_fraction: float = 1.0
    probe_epochs: int = 10
    labelled_fraction: float = 0.05
    test_images: int | None = None  # None: the whole test split
    batch_size: int = 128
    # Steps between logged training losses (the CSV rows the last-epoch pretraining loss is read from).
    log_every_n_steps: int = 50
    lr: float = 1.5e-3
    # LARS adapts each layer's step to lr x trust 0.001 x |w| (the gradient's scale drops out), so MAE's lr at
    # batch 16384 (0.1 x 16384 / 256 = 6.4) is used as is: scaled down to batch 128 by the /256 rule (0.05) the
    # head barely moves in a few hundred steps (measured: 18% vs 60% top-1 for MAE seed 0).
    probe_lr: float = 6.4
    # The finetune budget is chosen per encoder family on a held-out slice of the train split (images outside the
    # labelled subset, never the test split): the grid below, finetuned from scratch with seed 0, and the best
    # held-out top-1 sets (epochs, lr) for the pretrained and the scratch runs of that family alike. Chosen for
    # the scratch arm, so the baseline is the converged one.
    select_epochs: list[int] = field(default_factory=lambda: [15, 40])
    select_lrs: list[float] = field(default_factory=lambda: [5e-4, 1e-3, 2e-3])
    heldout_images: int = 5000
    # The supervised ceiling: the family's classifier from scratch on all 60k train labels at the chosen lr, this
    # many epochs (the chosen epochs are for 3k labels; 60k images per epoch need fewer), seed 0.
    ceiling_epochs: int = 10
    ceiling_fraction: float = 1.0
    # The learning curves: linear probe and kNN of the encoder after this many pretraining epochs (0: the random
    # initialisation), read from the epoch-end snapshots of the one pretraining run.
    curve_epochs: list[int] = field(default_factory=lambda: [0, 1, 2, 4])

    def select_grid(self) -> list[tuple[int, float]]:
        """The (epochs, lr) points of the budget selection, epochs-major."""
        return [(epochs, lr) for epochs in self.select_epochs for lr in self.select_lrs]

    def curve_points(self) -> list[int]:
        """The curve's pretraining epochs, those beyond ``pretrain_epochs`` dropped, ``pretrain_epochs`` kept."""
        return sorted({e for e in self.curve_epochs if 0 <= e <= self.pretrain_epochs} | {self.pretrain_epochs})

    @classmethod
    def full(cls) -> Budget:
        return cls(seeds=[0, 1, 2])

    @classmethod
    def quick(cls) -> Budget:
        return cls(seeds=[0], pretrain_epochs=2, pretrain_fraction=0.02, probe_epochs=1,
                   labelled_fraction=0.02, test_images=500, select_epochs=[1], select_lrs=[1e-3, 2e-3],
                   heldout_images=200, ceiling_epochs=1, ceiling_fraction=0.05, curve_epochs=[0, 1, 2],
                   log_every_n_steps=1)


def common_overrides(budget: Budget) -> list[str]:
    return ["data=fashion_mnist", f"data.batch_size={budget.batch_size}", "trainer.enable_progress_bar=false",
            f"trainer.log_every_n_steps={budget.log_every_n_steps}", "callbacks.progress_bar=null"]


def pretrain_overrides(method: Method, budget: Budget, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    """One pretraining run, with a snapshot at the end of every epoch (``checkpoints/epochNNN.ckpt``, all kept:
    the learning curves read them) besides ``last.ckpt``."""
    # experiment=null: not the demo run's settings (64px, repeat 16).
    return [f"method={method.name}", "experiment=null", *method.backbone, *common_overrides(budget), *method.pretrain,
            f"data.source.fraction={budget.pretrain_fraction}", f"trainer.max_epochs={budget.pretrain_epochs}",
            f"method.lr.value={budget.lr}", "method.lr.warmup_steps=100", "callbacks.reconstructions.every_n_steps=400",
            "callbacks.checkpoint.every_n_train_steps=null", "+callbacks.checkpoint.every_n_epochs=1",
            "callbacks.checkpoint.filename='epoch{epoch:03d}'", "callbacks.checkpoint.keep_last_k=-1",
            f"seed={seed}", f"run_dir={run_dir}", "resume=auto", *extra]


def downstream_overrides(method: Method, budget: Budget, seed: int, run_dir: Path, test_root: Path,
                         kind: str, pretrained: Path | None, extra: list[str], epochs: int | None = None,
                         lr: float | None = None, fraction: float | None = None) -> list[str]:
    """One finetune / probe run. A finetune or scratch run takes its family's chosen ``epochs`` and ``lr``; a probe
    runs the budget's probe epochs at the probe lr. ``fraction``, the labelled share of the train split, defaults
    to the budget's."""
    if kind == "linear_probe":
        epochs = budget.probe_epochs if epochs is None else epochs
    elif epochs is None or lr is None:
        raise ValueError(f"a {kind} run needs the chosen epochs and lr (got {epochs}, {lr})")
    fraction = budget.labelled_fraction if fraction is None else fraction
    overrides = [f"method={method.name}", *method.backbone, *common_overrides(budget), *method.finetune,
                 f"data.source.fraction={fraction}", f"val_root={test_root}",
                 f"mode={'linear_probe' if kind == 'linear_probe' else 'finetune'}",
                 f"pretrained={pretrained if pretrained is not None else 'null'}",
                 f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={epochs}",
                 "finetune.mixup=0", "finetune.cutmix=0", "finetune.augment.auto_augment=null",
                 "finetune.augment.reprob=0", "finetune.augment.crop_pct=1.0", "+finetune.augment.scale=[0.5,1.0]",
                 *([f"finetune.lr.value={lr}"] if lr is not None else []), "finetune.lr.warmup_epochs=1",
                 "finetune.linear_probe.lr.warmup_epochs=1", f"finetune.linear_probe.lr.value={budget.probe_lr}",
                 "callbacks.checkpoint.every_n_train_steps=100000",
                 f"seed={seed}", f"run_dir={run_dir}"]
    if kind == "scratch":
        overrides.append("finetune.layer_decay=1.0")
    return overrides + extra


def selection_scores(results: list[dict], family: str) -> dict[tuple[int, float], float]:
    """Held-out top-1 of ``family``'s selection runs by (epochs, lr)."""
    return {(r["epochs"], r["lr"]): r["top1"] for r in results if r["kind"] == "select" and r["family"] == family}


def select_budget(results: list[dict], family: str, budget: Budget) -> tuple[int, float]:
    """The (epochs, lr) of ``family`` with the best held-out top-1 among the grid's selection runs; ties go to
    fewer epochs, then the smaller lr. Raises when a grid point has not run."""
    scores = selection_scores(results, family)
    grid = budget.select_grid()
    missing = [point for point in grid if point not in scores]
    if missing:
        raise RuntimeError(f"budget selection for {family}: no held-out result for (epochs, lr) {missing}")
    return max(grid, key=lambda point: (scores[point], -point[0], -point[1]))
