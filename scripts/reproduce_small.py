"""Small-scale evidence that masked image modeling helps, on a CPU: Fashion-MNIST at 32px.

First, per encoder family (ViT, Swin, HiViT), the finetune budget (epochs, lr) is chosen on a held-out slice of
the train split outside the labelled subset: a small grid finetuned from scratch, best held-out top-1 (the test
split is never used to choose). Then, for each method (MAE, SimMIM, MixMAE, iTPN-pixel) and each seed:

1. pretrain a small encoder on the 60k train images without labels (``python -m mim_lightning.train`` with
   ``data=fashion_mnist``),
2. finetune it on a class-stratified labelled subset of train (5% = 3k images by default) and
3. linear-probe it on the same subset (frozen encoder, the method's probe recipe),
4. finetune the same classifier from random initialisation with the same recipe and chosen budget (the baseline),

and report the top-1 accuracy on the 10k test images (mean ± std over the seeds). Every stage is an ordinary
``mim_lightning.api.pretrain`` / ``finetune`` run composed from ``conf/`` with the overrides below, so the numbers
come from the same code paths users run.

    python scripts/reproduce_small.py                     # the committed table: ~1 h on a 2-core CPU
    python scripts/reproduce_small.py --quick --out /tmp/q  # a smoke run in a few minutes
    python scripts/reproduce_small.py trainer=gpu data.num_workers=8    # Hydra overrides for every run

Needs ``apt-get install dataset-fashion-mnist`` (the idx files in /usr/share/datasets/fashion-mnist).

Results are appended to ``<work-dir>/results.jsonl`` as each run finishes; running the command again skips what is
done (and a pretraining run that was interrupted resumes from its last checkpoint), so an interrupted
reproduction continues where it stopped. ``--out`` receives ``small_scale.md`` and ``small_scale.png`` (a
``small_scale_notes.md`` there, the hand-written reading of the numbers, is appended to the report); with
``--readme`` the table between the ``<!-- small-scale:begin -->`` / ``<!-- small-scale:end -->`` markers is
replaced.

Recipe choices (all visible in the overrides below): the scratch baseline runs without layer-wise lr decay
(decay only makes sense for pretrained lower layers, so this favours the baseline), everything else is the same
as the pretrained finetune. Mixup/CutMix/RandAugment/random erasing are off: at 28px and a few epochs they cost
more accuracy than they buy, for both arms alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_RAW_DIR = "/usr/share/datasets/fashion-mnist"
README_BEGIN, README_END = "<!-- small-scale:begin -->", "<!-- small-scale:end -->"

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
    pretrain_epochs: int = 1
    pretrain_fraction: float = 1.0
    finetune_epochs: int = 10
    probe_epochs: int = 10
    labelled_fraction: float = 0.05
    test_images: int | None = None  # None: the whole test split
    batch_size: int = 128
    lr: float = 1.5e-3
    finetune_lr: float = 1e-3
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

    def select_grid(self) -> list[tuple[int, float]]:
        """The (epochs, lr) points of the budget selection, epochs-major."""
        return [(epochs, lr) for epochs in self.select_epochs for lr in self.select_lrs]

    @classmethod
    def full(cls) -> Budget:
        return cls(seeds=[0, 1, 2])

    @classmethod
    def quick(cls) -> Budget:
        return cls(seeds=[0], pretrain_epochs=1, pretrain_fraction=0.02, finetune_epochs=1, probe_epochs=1,
                   labelled_fraction=0.02, test_images=500, select_epochs=[1], select_lrs=[1e-3, 2e-3],
                   heldout_images=200, ceiling_epochs=1, ceiling_fraction=0.05)


def common_overrides(budget: Budget) -> list[str]:
    return ["data=fashion_mnist", f"data.batch_size={budget.batch_size}", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=50", "callbacks.progress_bar=null"]


def pretrain_overrides(method: Method, budget: Budget, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    # experiment=null: not the demo run's settings (64px, repeat 16).
    return [f"method={method.name}", "experiment=null", *method.backbone, *common_overrides(budget), *method.pretrain,
            f"data.source.fraction={budget.pretrain_fraction}", f"trainer.max_epochs={budget.pretrain_epochs}",
            f"method.lr.value={budget.lr}", "method.lr.warmup_steps=100", "callbacks.reconstructions.every_n_steps=400",
            f"seed={seed}", f"run_dir={run_dir}", "resume=auto", *extra]


def downstream_overrides(method: Method, budget: Budget, seed: int, run_dir: Path, test_root: Path,
                         kind: str, pretrained: Path | None, extra: list[str], epochs: int | None = None,
                         lr: float | None = None, fraction: float | None = None) -> list[str]:
    """One finetune / probe run; ``epochs``, ``lr`` (finetune only) and the labelled ``fraction`` of the train
    split default to the budget's."""
    if epochs is None:
        epochs = budget.probe_epochs if kind == "linear_probe" else budget.finetune_epochs
    lr = budget.finetune_lr if lr is None else lr
    fraction = budget.labelled_fraction if fraction is None else fraction
    overrides = [f"method={method.name}", *method.backbone, *common_overrides(budget), *method.finetune,
                 f"data.source.fraction={fraction}", f"val_root={test_root}",
                 f"mode={'linear_probe' if kind == 'linear_probe' else 'finetune'}",
                 f"pretrained={pretrained if pretrained is not None else 'null'}",
                 f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={epochs}",
                 "finetune.mixup=0", "finetune.cutmix=0", "finetune.augment.auto_augment=null",
                 "finetune.augment.reprob=0", "finetune.augment.crop_pct=1.0", "+finetune.augment.scale=[0.5,1.0]",
                 f"finetune.lr.value={lr}", "finetune.lr.warmup_epochs=1",
                 "finetune.linear_probe.lr.warmup_epochs=1", f"finetune.linear_probe.lr.value={budget.probe_lr}",
                 "callbacks.checkpoint.every_n_train_steps=100000",
                 f"seed={seed}", f"run_dir={run_dir}"]
    if kind == "scratch":
        overrides.append("finetune.layer_decay=1.0")
    return overrides + extra


def test_folder(work_dir: Path, raw_dir: str, test_images: int | None) -> Path:
    """The test split's class folders, or a class-balanced subset of symlinks to them (``--quick``)."""
    from mim_lightning.data.fashion_mnist import export_split, stratified_subset
    from mim_lightning.data.sources import ClassFolderSource

    full = export_split(raw_dir, "test")
    if test_images is None:
        return full
    subset = work_dir / f"test_{test_images}"
    if (subset / ".complete").is_file():
        return subset
    samples = ClassFolderSource(str(full)).samples()
    return link_subset(subset, stratified_subset(samples, min(1.0, test_images / len(samples)), seed=0))


def link_subset(folder: Path, samples: list) -> Path:
    """``folder`` as class folders of symlinks to ``samples``, marked complete once every link is written."""
    for sample in samples:
        link = folder / Path(sample.path).parent.name / Path(sample.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(sample.path)
    (folder / ".complete").write_text("done\n")
    return folder


def heldout_folder(work_dir: Path, raw_dir: str, labelled_fraction: float, images: int) -> Path:
    """A class-stratified slice of the train split outside the labelled subset (symlinks): the budget selection's
    validation set, so that the test split is never used to choose."""
    from mim_lightning.data.fashion_mnist import FashionMNISTSource, export_split, stratified_subset
    from mim_lightning.data.sources import ClassFolderSource

    folder = work_dir / f"heldout_{labelled_fraction:g}_{images}"
    if (folder / ".complete").is_file():
        return folder
    labelled = {s.path for s in FashionMNISTSource(raw_dir=raw_dir, fraction=labelled_fraction).samples()} \
        if labelled_fraction < 1 else set()
    rest = [s for s in ClassFolderSource(str(export_split(raw_dir, "train"))).samples() if s.path not in labelled]
    if not rest:
        raise SystemExit("the labelled subset is the whole train split: no images are left for a held-out slice")
    return link_subset(folder, stratified_subset(rest, min(1.0, images / len(rest)), seed=1))


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


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_pretrain(overrides: list[str]) -> Path:
    from mim_lightning.api import checkpoint_dir, pretrain
    from mim_lightning.config import compose

    cfg = compose("pretrain", overrides)
    pretrain(cfg)
    ckpt = checkpoint_dir(cfg) / "last.ckpt"
    if not ckpt.is_file():
        raise RuntimeError(f"pretraining wrote no {ckpt}")
    return ckpt


def run_downstream(overrides: list[str]) -> float:
    from mim_lightning.api import finetune
    from mim_lightning.config import compose

    cfg = compose("finetune", overrides)
    trainer = finetune(cfg)
    top1 = trainer.callback_metrics.get("finetune/val_top1")
    if top1 is None:
        raise RuntimeError("the run logged no finetune/val_top1")
    return float(top1) * 100.0


def count_parameters(method: Method, extra: list[str]) -> int:
    from mim_lightning.api import build_finetune_module
    from mim_lightning.config import compose

    cfg = compose("finetune", [f"method={method.name}", *method.backbone, "data=fashion_mnist", *method.finetune,
                               *extra])
    module = build_finetune_module(cfg, num_classes=10)
    return sum(p.numel() for p in module.model.parameters())


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def summary_rows(results: list[dict], methods: list[Method]) -> list[dict]:
    rows = []
    for method in methods:
        mine = [r for r in results if r["method"] == method.name]

        def values(kind: str) -> list[float]:
            return [r["top1"] for r in mine if r["kind"] == kind]

        finetuned, probed, scratch = values("finetune"), values("linear_probe"), values("scratch")
        by_seed = {kind: {r["seed"]: r["top1"] for r in mine if r["kind"] == kind} for kind in ("finetune", "scratch")}
        gaps = [top1 - by_seed["scratch"][seed] for seed, top1 in sorted(by_seed["finetune"].items())
                if seed in by_seed["scratch"]]
        pretrain_s = [r["seconds"] for r in mine if r["kind"] == "pretrain"]
        gap_mean, gap_std = mean_std(gaps)
        if math.isnan(gap_mean):
            verdict = "–"
        elif gap_mean > 0 and (len(gaps) < 2 or gap_mean > gap_std):
            verdict = f"yes (+{gap_mean:.1f})"
        elif gap_mean > 0:
            verdict = f"within noise (+{gap_mean:.1f} ± {gap_std:.1f})"
        else:
            verdict = f"**no** ({gap_mean:.1f})"
        params = next((r.get("params") for r in mine if r.get("params")), None)
        rows.append({"method": method.label, "backbone": method.backbone[1].split("=")[1],
                     "params": f"{params / 1e6:.2f}M" if params else "–",
                     "pretrain_min": f"{statistics.fmean(pretrain_s) / 60:.1f}" if pretrain_s else "–",
                     "finetune": fmt(finetuned), "linear_probe": fmt(probed), "scratch": fmt(scratch),
                     "beats_scratch": verdict, "_values": (finetuned, probed, scratch),
                     "ceiling": fmt([r["top1"] for r in results
                                     if r["kind"] == "ceiling" and r.get("family") == method.family])})
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| Method | Encoder | Params | Pretrain (min/seed) | Finetune top-1 | Linear probe top-1 | "
            "Scratch top-1 | Supervised ceiling (60k labels) | Pretraining beats scratch? |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['backbone']} | {r['params']} | {r['pretrain_min']} | {r['finetune']} | "
                     f"{r['linear_probe']} | {r['scratch']} | {r['ceiling']} | {r['beats_scratch']} |")
    return "\n".join(lines)


def selection_table(results: list[dict], budget: Budget) -> str:
    """The held-out top-1 of every grid point per family, the chosen one in bold."""
    grid = budget.select_grid()
    lines = ["| Family (classifier) | " + " | ".join(f"{e} ep, lr {lr:g}" for e, lr in grid) + " | Chosen |",
             "|" + "---|" * (2 + len(grid))]
    for family, selector in SELECTION_METHOD.items():
        scores = selection_scores(results, family)
        if not scores:
            continue
        try:
            best = select_budget(results, family, budget)
        except RuntimeError:
            best = None
        cells = []
        for point in grid:
            value = f"{scores[point]:.1f}" if point in scores else "–"
            cells.append(f"**{value}**" if point == best else value)
        chosen = f"{best[0]} epochs, lr {best[1]:g}" if best else "incomplete"
        lines.append(f"| {family} ({METHODS[selector].label}) | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ("finetune (pretrained)", "linear probe", "finetune from scratch")
    colours = ("#1f77b4", "#9ecae1", "#ff7f0e")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.26
    for k, (kind, colour) in enumerate(zip(kinds, colours)):
        means, stds = zip(*(mean_std(r["_values"][k]) for r in rows)) if rows else ((), ())
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=kind, color=colour)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
    finite = [v for r in rows for vals in r["_values"] for v in vals]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def update_readme(readme: Path, table: str, doc_link: str) -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_BEGIN} ... {README_END} markers to put the table between")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    block = f"{README_BEGIN}\n{table}\n\nDetails, command and plot: [{doc_link}]({doc_link}).\n{README_END}"
    write_atomic(readme, head + block + tail)


def report(results: list[dict], methods: list[Method], budget: Budget, command: str, wall_s: float,
           out: Path, readme: Path | None) -> Path:
    import torch

    rows = summary_rows(results, methods)
    table = markdown_table(rows)
    seeds = ", ".join(str(s) for s in budget.seeds)
    labelled = round(60000 * budget.labelled_fraction)
    test = budget.test_images or 10000
    plot(rows, out / "small_scale.png",
         f"Fashion-MNIST 32px, {labelled} labels, test top-1 over seeds {seeds}")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    doc = f"""# Small-scale evidence: does pretraining help? (Fashion-MNIST, CPU)

Made by `scripts/reproduce_small.py` with

```
{command}
```

Compute time {sum(r["seconds"] for r in results) / 60:.0f} min (the sum over the {len(results)} runs recorded in
`results.jsonl`), {wall_s / 60:.0f} min wall time for the last invocation, on {machine}.

## Setup

- Data: Fashion-MNIST (`data=fashion_mnist`, from the Debian package), 28px grayscale resized to 32px.
  Pretraining: {round(60000 * budget.pretrain_fraction)} train images, no labels, {budget.pretrain_epochs} epoch(s),
  AdamW lr {budget.lr} at batch {budget.batch_size}, 100 warm-up steps, cosine; each method's own loss, mask and
  decoder (MAE 75% random, SimMIM 60% of 8px units, MixMAE 50% mix, iTPN 75% + pyramid).
- Labelled subset: a class-stratified {budget.labelled_fraction:.0%} of train ({labelled} images, the same for every
  run). Test: {test} test-split images.
- Finetune budget (epochs, lr), chosen per encoder family on a held-out slice of {budget.heldout_images} train images
  outside the labelled subset (never the test split): each point of the grid below finetuned from scratch (seed 0)
  on the labelled subset; the best held-out top-1 sets the budget of both the pretrained and the scratch runs of
  the family. Held-out top-1 (%):

{selection_table(results, budget)}

- Finetune: the chosen epochs and AdamW lr, 1 warm-up epoch, cosine, the method's
  official layer decay and drop path, label smoothing 0.1, RandomResizedCrop(0.5-1) + flip, no Mixup/CutMix/
  RandAugment/erasing. Scratch: the same classifier, recipe and budget from random init, without layer decay.
- Supervised ceiling: the family's classifier from scratch on all 60,000 train labels, {budget.ceiling_epochs}
  epochs at the family's chosen lr, seed 0, the same recipe otherwise.
- Linear probe: {budget.probe_epochs} epochs, the method's probe feature (MAE: cls token; the others: average
  pool), BatchNorm without affine + linear head, LARS (MAE's `main_linprobe.py` recipe) at lr {budget.probe_lr}
  (MAE's effective lr at batch 16384; the /256 rule would give {0.1 * budget.batch_size / 256:g} at batch
  {budget.batch_size}, too small a step for LARS in a few hundred steps), frozen encoder.
- Seeds {seeds}: each seed repeats the whole chain (pretraining included). Cells are mean ± sample std.

## Results (test top-1, %)

{table}

![test top-1 per method](small_scale.png)

"Beats scratch" is the mean of the per-seed gaps (pretrained finetune − scratch finetune); "within noise" when the
gap is smaller than its std over seeds.
"""
    notes = out / "small_scale_notes.md"
    if notes.is_file():  # the hand-written reading of the results, kept across regenerations
        doc += "\n" + notes.read_text()
    write_atomic(out / "small_scale.md", doc)
    if readme is not None:
        rel = os.path.relpath(out / "small_scale.md", readme.parent)
        update_readme(readme, table, rel)
    return out / "small_scale.md"


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run (e.g. trainer=gpu)")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run (1 seed, tiny subsets)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--probe-epochs", type=int, default=None)
    parser.add_argument("--labelled-fraction", type=float, default=None)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the supervised runs on all train labels")
    parser.add_argument("--raw-dir", default=DEFAULT_RAW_DIR, help="the Fashion-MNIST idx files")
    parser.add_argument("--work-dir", type=Path, default=None, help="runs and results.jsonl "
                        "(default outputs/reproduce_small[_quick])")
    parser.add_argument("--out", type=Path, default=None, help="where small_scale.md/.png go (default docs/; "
                        "--quick: the work dir)")
    parser.add_argument("--readme", type=Path, default=None, help="a README with small-scale markers to update "
                        "(default: README.md for a full run into docs/)")
    args = parser.parse_args(argv)

    budget = Budget.quick() if args.quick else Budget.full()
    for key in ("seeds", "pretrain_epochs", "finetune_epochs", "probe_epochs", "labelled_fraction"):
        if getattr(args, key) is not None:
            setattr(budget, key, getattr(args, key))
    work = (args.work_dir or REPO / ("outputs/reproduce_small_quick" if args.quick else "outputs/reproduce_small"))
    work = work.resolve()
    out = (args.out or (work if args.quick else REPO / "docs")).resolve()
    readme = args.readme
    if readme is None and not args.quick and args.out is None:
        readme = REPO / "README.md"
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.jsonl"
    methods = [METHODS[name] for name in args.methods]
    args.overrides = [f"data.source.raw_dir={args.raw_dir}", *args.overrides]

    from mim_lightning.errors import ConfigError

    quiet()
    start = time.perf_counter()
    try:
        test_root = test_folder(work, args.raw_dir, budget.test_images)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = load_results(results_path)
    done = {(r["method"], r["seed"], r["kind"]) for r in results}
    heldout = heldout_folder(work, args.raw_dir, budget.labelled_fraction, budget.heldout_images)

    def record(method: Method, seed: int, kind: str, seconds: float, **values) -> None:
        entry = {"method": method.name, "seed": seed, "kind": kind, "seconds": round(seconds, 1), **values}
        append_result(results_path, entry)
        results.append(entry)
        done.add((method.name, seed, kind))
        shown = f"top-1 {values['top1']:.2f}" if "top1" in values else "done"
        budget_run = f" [{values['epochs']} epochs, lr {values['lr']:g}]" if "epochs" in values else ""
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {method.label:10s} seed {seed} {kind:12s} "
              f"{shown}{budget_run} ({seconds:.0f} s)", flush=True)

    chosen: dict[str, tuple[int, float]] = {}
    for family in dict.fromkeys(m.family for m in methods):
        selector = METHODS[SELECTION_METHOD[family]]
        for epochs, lr in budget.select_grid():
            if (epochs, lr) in selection_scores(results, family):
                continue
            t0 = time.perf_counter()
            top1 = run_downstream(downstream_overrides(
                selector, budget, 0, work / "select" / family / f"e{epochs}_lr{lr:g}", heldout, "scratch", None,
                args.overrides, epochs=epochs, lr=lr))
            record(selector, 0, "select", time.perf_counter() - t0, family=family, epochs=epochs, lr=lr, top1=top1)
        chosen[family] = select_budget(results, family, budget)
        print(f"budget for {family}: {chosen[family][0]} epochs, lr {chosen[family][1]:g}", flush=True)
        if not args.no_ceiling and not any(r["kind"] == "ceiling" and r["family"] == family for r in results):
            epochs, lr = budget.ceiling_epochs, chosen[family][1]
            t0 = time.perf_counter()
            top1 = run_downstream(downstream_overrides(
                selector, budget, 0, work / "ceiling" / family, test_root, "scratch", None,
                args.overrides, epochs=epochs, lr=lr, fraction=budget.ceiling_fraction))
            record(selector, 0, "ceiling", time.perf_counter() - t0, family=family, epochs=epochs, lr=lr,
                   fraction=budget.ceiling_fraction, top1=top1)

    for seed in budget.seeds:
        for method in methods:
            run_root = work / f"seed{seed}" / method.name
            ckpt = run_root / "pretrain" / "checkpoints" / "last.ckpt"
            if (method.name, seed, "pretrain") not in done:
                t0 = time.perf_counter()
                ckpt = run_pretrain(pretrain_overrides(method, budget, seed, run_root / "pretrain", args.overrides))
                record(method, seed, "pretrain", time.perf_counter() - t0, ckpt=str(ckpt))
            for kind in ("finetune", "linear_probe", "scratch"):
                if (method.name, seed, kind) in done:
                    continue
                t0 = time.perf_counter()
                epochs, lr = (None, None) if kind == "linear_probe" else chosen[method.family]
                top1 = run_downstream(downstream_overrides(
                    method, budget, seed, run_root / kind, test_root, kind,
                    None if kind == "scratch" else ckpt, args.overrides, epochs=epochs, lr=lr))
                params = count_parameters(method, args.overrides) if kind == "finetune" else None
                record(method, seed, kind, time.perf_counter() - t0, top1=top1,
                       **({"params": params} if params else {}),
                       **({"epochs": epochs, "lr": lr} if epochs is not None else {}))

    wall = time.perf_counter() - start
    command = "python scripts/reproduce_small.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    path = report([r for r in results if r["seed"] in budget.seeds and r["method"] in args.methods], methods, budget,
                  command.strip(), wall, out, readme)
    print(f"wrote {path} and {path.with_suffix('.png')} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
