"""Small-scale evidence that masked image modeling helps, on a CPU: Fashion-MNIST at 32px.

First, per encoder family (ViT, Swin, HiViT), the finetune budget (epochs, lr) is chosen on a held-out slice of
the train split outside the labelled subset: a small grid finetuned from scratch, best held-out top-1 (the test
split is never used to choose); the family's classifier trained from scratch on all 60k train labels at the chosen
lr is the supervised ceiling. Then, for each method (MAE, SimMIM, MixMAE, iTPN-pixel) and each seed:

1. pretrain a small encoder on the 60k train images without labels (``python -m mim_lightning.train`` with
   ``data=fashion_mnist``, 4 epochs), keeping a snapshot at the end of every epoch,
2. finetune it on a class-stratified labelled subset of train (5% = 3k images by default) at the family's budget,
3. linear-probe it on the same subset (frozen encoder, the method's probe recipe),
4. finetune the same classifier from random initialisation with the same recipe and budget (the baseline),
5. the learning curve: linear probe and kNN (k=20 on the labelled subset's probe features) of the encoder after
   0 (random initialisation), 1, 2 and 4 pretraining epochs, read from the snapshots,

and report the top-1 accuracy on the 10k test images (mean ± std over the seeds). Every stage is an ordinary
``mim_lightning.api.pretrain`` / ``finetune`` run composed from ``conf/`` with the overrides in
:mod:`small_scale.study`, so the numbers come from the same code paths users run.

    python scripts/reproduce_small.py                       # the whole study: about 7 h on a 2-core CPU
    python scripts/reproduce_small.py --quick --out /tmp/q  # a smoke run in a few minutes
    python scripts/reproduce_small.py trainer=gpu data.num_workers=8    # Hydra overrides for every run

On a 2-core machine the study is split into invocations of under 90 minutes that append to one results file
(each skips what the file already holds; the report covers every method the file has runs of):

    python scripts/reproduce_small.py --budget-only --results docs/small_scale_results.jsonl   # selection, ceilings
    python scripts/reproduce_small.py --methods mae --seeds 0 --results docs/small_scale_results.jsonl
    ...                                                    # one (method, seed) chain is about 30 min

Needs ``apt-get install dataset-fashion-mnist`` (the idx files in /usr/share/datasets/fashion-mnist).

Results are appended to ``--results`` (default ``<work-dir>/results.jsonl``) as each run finishes; running the
command again skips what is done (and a pretraining run that was interrupted resumes from its last checkpoint), so
an interrupted reproduction continues where it stopped. ``--out`` receives ``small_scale.md``, ``small_scale.png``
and ``small_scale_curves.png`` (a ``small_scale_notes.md`` there, the hand-written reading of the numbers, is
appended to the report); with ``--readme`` the table between the ``<!-- small-scale:begin -->`` /
``<!-- small-scale:end -->`` markers is replaced.

Recipe choices (all visible in :mod:`small_scale.study`): the scratch baseline runs without layer-wise lr decay
(decay only makes sense for pretrained lower layers, so this favours the baseline), everything else is the same
as the pretrained finetune. Mixup/CutMix/RandAugment/random erasing are off: at 28px and a few epochs they cost
more accuracy than they buy, for both arms alike.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from small_scale.report import (  # noqa: E402
    README_BEGIN, README_END, curve_values, curves_table, markdown_table, pretrain_loss_table, report,
    selection_table, summary_rows, update_readme,
)
from small_scale.runs import (  # noqa: E402
    append_result, count_parameters, epoch_snapshots, heldout_folder, labelled_folder, last_epoch_loss,
    link_subset, load_results, run_downstream, run_knn, run_pretrain, test_folder,
)
from small_scale.study import (  # noqa: E402
    METHODS, SELECTION_METHOD, Budget, Method, downstream_overrides, pretrain_overrides, select_budget,
    selection_scores,
)

DEFAULT_RAW_DIR = "/usr/share/datasets/fashion-mnist"
__all__ = ["README_BEGIN", "README_END", "METHODS", "SELECTION_METHOD", "Budget", "Method", "append_result",
           "build_parser",
           "count_parameters", "curve_values", "curves_table", "downstream_overrides", "epoch_snapshots",
           "heldout_folder", "labelled_folder", "last_epoch_loss", "link_subset", "load_results", "main",
           "markdown_table", "pretrain_loss_table", "pretrain_overrides", "report", "run_downstream", "run_knn",
           "run_pretrain", "select_budget", "selection_scores", "selection_table", "summary_rows", "test_folder",
           "update_readme"]


def has_chain(results: list[dict], method: Method) -> bool:
    """Whether the results hold any of ``method``'s own runs (not only the budget selection it stood in for)."""
    return any(r["method"] == method.name and r["kind"] not in ("select", "ceiling") for r in results)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are parsed with it in the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run (e.g. trainer=gpu)")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run (1 seed, tiny subsets)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--probe-epochs", type=int, default=None)
    parser.add_argument("--labelled-fraction", type=float, default=None)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the supervised runs on all train labels")
    parser.add_argument("--budget-only", action="store_true", help="run the budget selection (and the ceiling) of "
                        "the methods' families, then stop")
    parser.add_argument("--results", type=Path, default=None, help="the results file to append to and resume from "
                        "(default <work-dir>/results.jsonl)")
    parser.add_argument("--raw-dir", default=DEFAULT_RAW_DIR, help="the Fashion-MNIST idx files")
    parser.add_argument("--work-dir", type=Path, default=None, help="runs and results.jsonl "
                        "(default outputs/reproduce_small[_quick])")
    parser.add_argument("--out", type=Path, default=None, help="where small_scale.md/.png go (default docs/; "
                        "--quick: the work dir)")
    parser.add_argument("--readme", type=Path, default=None, help="a README with small-scale markers to update "
                        "(default: README.md for a full run into docs/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    budget = Budget.quick() if args.quick else Budget.full()
    for key in ("seeds", "pretrain_epochs", "probe_epochs", "labelled_fraction"):
        if getattr(args, key) is not None:
            setattr(budget, key, getattr(args, key))
    work = (args.work_dir or REPO / ("outputs/reproduce_small_quick" if args.quick else "outputs/reproduce_small"))
    work = work.resolve()
    out = (args.out or (work if args.quick else REPO / "docs")).resolve()
    readme = args.readme
    if readme is None and not args.quick and args.out is None:
        readme = REPO / "README.md"
    work.mkdir(parents=True, exist_ok=True)
    results_path = (args.results or work / "results.jsonl").resolve()
    results_path.parent.mkdir(parents=True, exist_ok=True)
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
    heldout = heldout_folder(work, args.raw_dir, budget.labelled_fraction, budget.heldout_images)
    bank = labelled_folder(work, args.raw_dir, budget.labelled_fraction)

    def record(method: Method, seed: int, kind: str, seconds: float, **values) -> None:
        entry = {"method": method.name, "seed": seed, "kind": kind, "seconds": round(seconds, 1), **values}
        append_result(results_path, entry)
        results.append(entry)
        shown = f"top-1 {values['top1']:.2f}" if "top1" in values else "done"
        budget_run = f" [{values['epochs']} epochs, lr {values['lr']:g}]" if "lr" in values else ""
        if kind == "curve":
            budget_run = f" [{values['metric']} after {values['at']} pretraining epochs]"
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {method.label:10s} seed {seed} {kind:12s} "
              f"{shown}{budget_run} ({seconds:.0f} s)", flush=True)

    def has(method: Method, seed: int, kind: str, **fields) -> bool:
        return any(r["method"] == method.name and r["seed"] == seed and r["kind"] == kind
                   and all(r.get(key) == value for key, value in fields.items()) for r in results)

    def run_chain(method: Method, seed: int) -> None:
        """Pretraining (epoch-end snapshots), finetune, linear probe, scratch, and the learning-curve points."""
        run_root = work / f"seed{seed}" / method.name
        checkpoints = run_root / "pretrain" / "checkpoints"
        ckpt = checkpoints / "last.ckpt"
        if not has(method, seed, "pretrain"):
            t0 = time.perf_counter()
            ckpt, loss = run_pretrain(pretrain_overrides(method, budget, seed, run_root / "pretrain", args.overrides))
            record(method, seed, "pretrain", time.perf_counter() - t0, ckpt=str(ckpt), epochs=budget.pretrain_epochs,
                   final_loss=loss)
        for kind in ("finetune", "linear_probe", "scratch"):
            if has(method, seed, kind):
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
        snapshots = {0: None, **epoch_snapshots(checkpoints)}
        for at in budget.curve_points():
            for metric in ("linear_probe", "knn"):
                if (metric == "linear_probe" and at == budget.pretrain_epochs) or has(method, seed, "curve", at=at,
                                                                                      metric=metric):
                    continue  # the probe after the whole pretraining is the linear_probe run above
                if at not in snapshots:
                    raise RuntimeError(f"{method.name} seed {seed}: no snapshot after {at} pretraining epochs in "
                                       f"{checkpoints} (found {sorted(snapshots)}); delete its pretrain record to "
                                       "pretrain again")
                t0 = time.perf_counter()
                overrides = downstream_overrides(method, budget, seed, run_root / f"curve_{metric}_{at}", test_root,
                                                 "linear_probe", snapshots[at], args.overrides)
                top1 = (run_downstream(overrides) if metric == "linear_probe"
                        else run_knn(overrides, bank, test_root, seed))
                record(method, seed, "curve", time.perf_counter() - t0, at=at, metric=metric, top1=top1)

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
    if args.budget_only:
        print(f"budget selection done ({(time.perf_counter() - start) / 60:.1f} min); results in {results_path}")
        return 0

    for seed in budget.seeds:
        for method in methods:
            run_chain(method, seed)

    wall = time.perf_counter() - start
    command = "python scripts/reproduce_small.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    # every method of the results file, so that per-method invocations into one file report the whole study
    reported = [m for m in METHODS.values() if m in methods or has_chain(results, m)]
    path = report([r for r in results if r["seed"] in budget.seeds], reported, budget, command.strip(), wall, out,
                  readme)
    print(f"wrote {path} and {path.with_suffix('.png')} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
