"""The study's report: the results table with verdicts, the budget-selection table, the learning curves and the
pretraining losses, the plots, and ``docs/small_scale.md`` (plus the README's table)."""

from __future__ import annotations

import math
import os
import platform
import statistics
from pathlib import Path

from .study import METHODS, SELECTION_METHOD, Budget, Method, select_budget, selection_scores

README_BEGIN, README_END = "<!-- small-scale:begin -->", "<!-- small-scale:end -->"


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
    save_figure(fig, path)
    plt.close(fig)


def curve_values(results: list[dict], method: str, budget: Budget) -> dict[str, dict[int, list[float]]]:
    """Per metric (``linear_probe``, ``knn``), the test top-1 over seeds after each curve epoch. The linear probe
    after the whole pretraining is the study's ``linear_probe`` run; the other points are ``curve`` runs."""
    values: dict[str, dict[int, list[float]]] = {"linear_probe": {}, "knn": {}}
    for r in results:
        if r["method"] != method or r["seed"] not in budget.seeds:
            continue
        if r["kind"] == "curve":
            values[r["metric"]].setdefault(r["at"], []).append(r["top1"])
        elif r["kind"] == "linear_probe":
            values["linear_probe"].setdefault(budget.pretrain_epochs, []).append(r["top1"])
    return values


def curves_table(results: list[dict], methods: list[Method], budget: Budget) -> str:
    """Linear-probe and kNN test top-1 after 0 (random init), 1, ... pretraining epochs, mean ± std over seeds."""
    points = budget.curve_points()
    cols = [f"{metric} @ {e} ep" for metric in ("probe", "kNN") for e in points]
    lines = ["| Method | " + " | ".join(cols) + " |", "|" + "---|" * (1 + len(cols))]
    for method in methods:
        values = curve_values(results, method.name, budget)
        cells = [fmt(values[metric].get(e, [])) for metric in ("linear_probe", "knn") for e in points]
        lines.append(f"| {method.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pretrain_loss_table(results: list[dict], methods: list[Method], budget: Budget) -> str:
    """The mean training loss of the last pretraining epoch, per seed (a plateau shows as a seed far above the
    others)."""
    lines = ["| Method | " + " | ".join(f"seed {s}" for s in budget.seeds) + " |", "|" + "---|" * (1 + len(budget.seeds))]
    for method in methods:
        by_seed = {r["seed"]: r.get("final_loss") for r in results
                   if r["method"] == method.name and r["kind"] == "pretrain"}
        cells = [f"{by_seed[s]:.3f}" if by_seed.get(s) is not None else "–" for s in budget.seeds]
        lines.append(f"| {method.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: list[dict], methods: list[Method], budget: Budget, path: Path) -> None:
    """One panel per method: probe and kNN top-1 against pretraining epochs (mean, std band), and the
    method's scratch finetune as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(3.2 * max(1, len(methods)), 3.2), sharey=True,
                             squeeze=False)
    for ax, method in zip(axes[0], methods):
        values = curve_values(results, method.name, budget)
        for metric, label, colour in (("linear_probe", "linear probe", "#1f77b4"), ("knn", "kNN (k=20)", "#2ca02c")):
            xs = sorted(e for e, v in values[metric].items() if v)
            if not xs:
                continue
            means, stds = zip(*(mean_std(values[metric][e]) for e in xs))
            ax.plot(xs, means, marker="o", label=label, color=colour)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colour, alpha=0.2)
        scratch = [r["top1"] for r in results if r["method"] == method.name and r["kind"] == "scratch"
                   and r["seed"] in budget.seeds]
        if scratch:
            ax.axhline(statistics.fmean(scratch), color="#ff7f0e", linestyle="--", label="finetune from scratch")
        ax.set_title(method.label, fontsize=10)
        ax.set_xlabel("pretraining epochs")
        ax.set_xticks(budget.curve_points())
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
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
    plot_curves(results, methods, budget, out / "small_scale_curves.png")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    doc = f"""# Small-scale evidence: does pretraining help? (Fashion-MNIST, CPU)

Made by `scripts/reproduce_small.py` with

```
{command}
```

Compute time {sum(r["seconds"] for r in results) / 60:.0f} min (the sum over the {len(results)} runs recorded in
the results file), {wall_s / 60:.0f} min wall time for the last invocation, on {machine}.

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

## Learning curves (test top-1, %)

The frozen encoder after 0 (its random initialisation), {", ".join(str(e) for e in budget.curve_points()[1:])}
pretraining epochs (the epoch-end snapshots of the one pretraining run per seed): the linear probe (the recipe
above) and a kNN classifier on the same feature (k=20, cosine, weighted vote as in DINO; the labelled subset is the
bank, evaluation transform).

{curves_table(results, methods, budget)}

![linear probe and kNN against pretraining epochs](small_scale_curves.png)

Mean training loss of the last pretraining epoch per seed (a seed on a plateau shows as an outlier):

{pretrain_loss_table(results, methods, budget)}
"""
    notes = out / "small_scale_notes.md"
    if notes.is_file():  # the hand-written reading of the results, kept across regenerations
        doc += "\n" + notes.read_text()
    write_atomic(out / "small_scale.md", doc)
    if readme is not None:
        rel = os.path.relpath(out / "small_scale.md", readme.parent)
        update_readme(readme, table, rel)
    return out / "small_scale.md"
