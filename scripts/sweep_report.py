"""Summarise a Hydra multirun of pretraining jobs: one table row per job and a plot.

    python -m mim_lightning.train -m mask.ratio=0.4,0.6,0.75 mask.unit=16,32 hydra.sweep.dir=multirun/masks
    python scripts/sweep_report.py multirun/masks            # writes multirun/masks/sweep_report.{csv,md,png}
    python scripts/sweep_report.py multirun/masks --out reports/masks

Every folder under the given one that holds a run's ``config.yaml`` (the resolved config the run wrote,
not Hydra's ``.hydra/config.yaml``) is a job. From its ``csv/metrics.csv`` (``logger=csv``, the default)
the report takes the last logged ``train/loss``, ``val/loss``, ``probe/knn_top1`` and
``probe/linear_top1``, the last step, and ``mask/avg_dist`` (SimMIM's AvgDist, logged at the start of
each run; computed from the job's mask config when missing). The table lists, per job, the overrides
that differ between jobs, the method, backbone, mask type, ``mask.ratio``, ``mask.unit`` and those
metrics; the plot has one row per metric and one column per x-axis (mask ratio, mask unit, AvgDist),
one line per value of the other swept keys.

Each job also gets a ``status`` and a ``reason``: ``ok``; ``failed`` (an exception or error line in the
job's ``*.log`` or its submitit ``<job id>_<task>_log.err/.out``, no usable checkpoint although the config
has a checkpoint callback, metrics logged after the newest ``last.ckpt``, i.e. a crash or kill without the
final save, or no metrics at all); ``unfinished`` (stopped by a signal, or the newest checkpoint or the
metrics end before the config's ``trainer.max_steps`` / ``trainer.max_epochs``: interrupted, still running,
or stopped early). A job whose newest checkpoint is at the planned end stays ``ok`` despite an error in
its logs (a failure after training, or an earlier attempt of a resumed job); the reason names the error.
Only ``ok`` jobs are plotted; a line on stderr names the others.

Exit status 2 with a one-line message when the folder holds no job.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

#: Metric columns: (column name, metric key in metrics.csv, which logged value is kept).
METRICS = (
    ("train/loss", "train/loss", "last"),
    ("val/loss", "val/loss", "last"),
    ("probe/knn_top1", "probe/knn_top1", "last"),
    ("probe/linear_top1", "probe/linear_top1", "last"),
)
#: The x-axes of the plot: (column, axis label).
X_AXES = (("mask.ratio", "mask ratio"), ("mask.unit", "mask unit (px)"), ("mask/avg_dist", "AvgDist (px)"))
IGNORED_OVERRIDES = ("run_dir", "hydra.", "ckpt_path", "resume")
#: How much of the end of each log file is searched for errors.
LOG_TAIL_BYTES = 2 * 2**20
#: Error lines in a job's logs: (pattern, status); the first group is the reason.
LOG_ERRORS = (
    (re.compile(r"^mim_lightning: error: (.+)$"), "failed"),
    (re.compile(r"^mim_lightning: (stopped by a signal)"), "unfinished"),
    (re.compile(r"^slurmstepd: error: \*+ (.+?) \*+\s*$"), "failed"),
    (re.compile(r"^.*(Detected KeyboardInterrupt)"), "unfinished"),
)
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Failure)\b.*)$")


class ReportError(Exception):
    """A problem with the input (one line)."""


def find_jobs(root: Path) -> list[Path]:
    """Run folders under ``root`` (or ``root`` itself): those with a ``config.yaml`` outside ``.hydra``."""
    found = {path.parent for path in root.rglob("config.yaml") if path.parent.name != ".hydra"}
    if (root / "config.yaml").is_file():
        found.add(root)
    return sorted(found, key=_job_sort_key)


def _job_sort_key(path: Path) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)


def read_metrics(path: Path) -> dict[str, float]:
    """Last non-empty value of every metric in a Lightning ``metrics.csv`` (first for ``mask/avg_dist``),
    plus ``step`` and ``epoch`` (the largest logged)."""
    values: dict[str, float] = {}
    if not path.is_file():
        return values
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, text in row.items():
                if key is None or text in (None, ""):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    continue
                if key in ("step", "epoch"):
                    values[key] = max(values.get(key, value), value)
                elif key == "mask/avg_dist":
                    values.setdefault(key, value)
                else:
                    values[key] = value
    return values


def swept_overrides(jobs: Sequence[Path]) -> list[dict[str, str]]:
    """Per job, the ``key=value`` overrides (from ``.hydra/overrides.yaml``) whose value differs between jobs."""
    per_job = []
    for job in jobs:
        path = job / ".hydra" / "overrides.yaml"
        items = yaml.safe_load(path.read_text()) if path.is_file() else []
        pairs = {}
        for item in items or []:
            key, _, value = str(item).partition("=")
            if not any(key.lstrip("+~").startswith(prefix) for prefix in IGNORED_OVERRIDES):
                pairs[key.lstrip("+")] = value
        per_job.append(pairs)
    keys = sorted({key for pairs in per_job for key in pairs})
    varying = [key for key in keys if len({pairs.get(key) for pairs in per_job}) > 1]
    return [{key: pairs.get(key, "") for key in varying} for pairs in per_job]


def _short_target(node: Any) -> str:
    if isinstance(node, dict):
        return str(node.get("_target_", "")).rsplit(".", 1)[-1]
    return "" if node is None else str(node)


def _avg_dist_from_config(mask: dict | None) -> float | None:
    """AvgDist of the job's mask generator (64 seeded masks), when the run did not log it."""
    if not isinstance(mask, dict) or "_target_" not in mask:
        return None
    try:
        from hydra.utils import instantiate

        from mim_lightning.mask_stats import mask_statistics

        return mask_statistics(instantiate(mask))["mask/avg_dist"]
    except Exception:  # noqa: BLE001 - a mask this checkout cannot build: leave the cell empty
        return None


def _tail_lines(path: Path) -> list[str]:
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            return handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []


def job_logs(job: Path, root: Path) -> list[Path]:
    """The job's own ``*.log`` files (Hydra's ``train.log`` / ``finetune.log``) and, under a submitit
    launcher, its ``<root>/.submitit/**/<job id>_<task>_log.{err,out}`` files."""
    logs = sorted(path for path in job.glob("*.log") if path.is_file())
    hydra = job / ".hydra" / "hydra.yaml"
    job_id = None
    if hydra.is_file():
        try:
            job_id = ((yaml.safe_load(hydra.read_text()) or {}).get("hydra", {}).get("job", {}) or {}).get("id")
        except yaml.YAMLError:
            job_id = None
    submitit = root / ".submitit"
    if job_id not in (None, "") and submitit.is_dir():
        name = re.compile(rf"^{re.escape(str(job_id))}_\d+_log\.(err|out)$")
        logs += sorted(path for path in submitit.rglob("*_log.*") if name.match(path.name) and path.is_file())
    return logs


def log_error(paths: Sequence[Path]) -> tuple[str, str] | None:
    """``(status, reason)`` of the last error in the logs: a traceback's exception line, a mim_lightning
    error line, a SLURM cancellation, a stop by a signal; None when the logs show none."""
    found = None
    for path in paths:
        lines = _tail_lines(path)
        for i, line in enumerate(lines):
            text = line.rstrip()
            if text.startswith(_TRACEBACK):
                # the exception is the first unindented line after the traceback's frames
                for after in lines[i + 1:]:
                    if after and not after[0].isspace():
                        match = _EXCEPTION_LINE.match(after.rstrip())
                        if match:
                            found = ("failed", match.group(1))
                        break
                continue
            for pattern, status in LOG_ERRORS:
                match = pattern.match(text)
                if match:
                    found = (status, match.group(1))
                    break
        if found:
            reason = found[1] if len(found[1]) <= 200 else found[1][:197] + "..."
            return found[0], f"{reason} ({path.name})"
    return None


def checkpoint_folder(job: Path, config: dict) -> Path | None:
    """The job's checkpoint folder: ``callbacks.checkpoint.dirpath`` if it exists, else ``<job>/checkpoints``."""
    node = (config.get("callbacks") or {}).get("checkpoint") if isinstance(config.get("callbacks"), dict) else None
    for folder in ([Path(str(node["dirpath"]))] if isinstance(node, dict) and node.get("dirpath") else []) + [
            job / "checkpoints"]:
        if folder.is_dir():
            return folder
    return None


def newest_checkpoint(folder: Path | None) -> tuple[Path, dict] | None:
    """The newest loadable checkpoint in ``folder`` (by modification time, ``last.ckpt`` first on ties)
    with its non-tensor content (tensors are memory-mapped, not read), or None."""
    if folder is None:
        return None
    import torch

    candidates = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")]
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True):
        source = path / "meta.pt" if path.is_dir() else path  # a sharded (FSDP) checkpoint folder
        try:
            state = torch.load(source, map_location="cpu", weights_only=False, mmap=not path.is_dir())
        except Exception:  # noqa: BLE001 - a damaged file: try the next one
            continue
        if isinstance(state, dict) and "global_step" in state:
            return path, state
    return None


def _positive(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number > 0 else None


def _plan(trainer: dict) -> tuple[int | None, int | None, str]:
    max_steps, max_epochs = _positive(trainer.get("max_steps")), _positive(trainer.get("max_epochs"))
    text = " / ".join(part for part in (max_steps and f"max_steps={max_steps}",
                                        max_epochs and f"max_epochs={max_epochs}") if part)
    return max_steps, max_epochs, text


def checkpoint_progress(found: tuple[Path, dict], trainer: dict) -> tuple[bool | None, str]:
    """Whether the checkpoint is at the planned end of training (None when the config plans no end), and
    where it is."""
    path, state = found
    max_steps, max_epochs, plan = _plan(trainer)
    step, epoch = int(state["global_step"]), int(state.get("epoch", 0))
    batches = ((state.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.batch_progress") or {}
    epochs_done = epoch + 1 if batches.get("is_last_batch") else epoch
    where = f"checkpoint {path.name} at step {step}, {epochs_done} epoch(s) done; {plan}"
    if not plan:
        return None, where
    done = (max_steps is not None and step >= max_steps) or (max_epochs is not None and epochs_done >= max_epochs)
    return done, where


def job_status(job: Path, root: Path, config: dict, metrics: dict[str, float]) -> tuple[str, str]:
    """``(status, reason)`` of a job: ``ok``, ``failed`` or ``unfinished`` (see the module docstring).

    An error in the logs of a job whose newest checkpoint is at the planned end (a failure after training,
    or an earlier attempt of a resumed job) leaves it ``ok``, with the error as the reason."""
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    callbacks = config.get("callbacks") if isinstance(config.get("callbacks"), dict) else {}
    found = newest_checkpoint(checkpoint_folder(job, config))
    done, where = checkpoint_progress(found, trainer) if found is not None else (None, "")
    logged = int(metrics.get("step", -1))
    after_last = found is not None and found[0].name.startswith("last") and logged > found[1]["global_step"]
    error = log_error(job_logs(job, root))
    if error:
        return ("ok", f"finished; the logs also show: {error[1]}") if done and not after_last else error
    if isinstance(callbacks.get("checkpoint"), dict) and found is None:
        return "failed", "no checkpoint"
    logger = config.get("logger", "csv")
    if (logger == "csv" or (isinstance(logger, dict) and "csv" in logger)) and "step" not in metrics:
        return "failed", "no metrics logged"
    if after_last:  # the final save of a run that ends (RunCheckpoint.on_train_end) never happened
        return "failed", (f"metrics go on to step {logged} after the last checkpoint (step "
                          f"{found[1]['global_step']}): crashed or killed (or still running)")
    if done is False:
        return "unfinished", where
    max_steps, max_epochs, plan = _plan(trainer)
    if found is None and plan and "step" in metrics:
        # only the logged progress can say (step logs carry the step before the update; a partly
        # trained last epoch cannot be told from a complete one)
        every = _positive(trainer.get("log_every_n_steps")) or 50
        last_epoch = int(metrics.get("epoch", 0))
        if not ((max_steps is not None and logged + every >= max_steps)
                or (max_epochs is not None and last_epoch + 1 >= max_epochs)):
            return "unfinished", f"metrics end at step {logged} in epoch {last_epoch + 1}; {plan}"
    return "ok", ""


def job_row(job: Path, root: Path, overrides: dict[str, str]) -> dict[str, Any]:
    """The table row of one job: its swept overrides, settings, last metrics, status and reason."""
    config = yaml.safe_load((job / "config.yaml").read_text()) or {}
    method = config.get("method") or {}
    mask = config.get("mask")
    metrics = read_metrics(job / "csv" / "metrics.csv")
    avg_dist = metrics.get("mask/avg_dist")
    if avg_dist is None:
        avg_dist = _avg_dist_from_config(mask)
    row: dict[str, Any] = {"job": str(job.relative_to(root)) if job != root else "."}
    row.update(overrides)
    row.update({
        "method": _short_target(method.get("model")),
        "backbone": (config.get("backbone") or {}).get("name", ""),
        "mask": _short_target(mask) or "model",
        "mask.ratio": (mask or {}).get("ratio") if isinstance(mask, dict) else None,
        "mask.unit": (mask or {}).get("unit") if isinstance(mask, dict) else None,
        "mask/avg_dist": avg_dist,
        "step": int(metrics["step"]) if "step" in metrics else None,
    })
    for column, key, _ in METRICS:
        row[column] = metrics.get(key)
    row["status"], row["reason"] = job_status(job, root, config, metrics)
    return row


def build_rows(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per job, and the override keys that differ between jobs."""
    if not root.is_dir():
        raise ReportError(f"{root}: no such folder (give the multirun folder, e.g. multirun/2026-01-01/12-00-00)")
    jobs = find_jobs(root)
    if not jobs:
        raise ReportError(f"{root}: no runs found (no <job>/config.yaml); is this a multirun folder?")
    overrides = swept_overrides(jobs)
    return [job_row(job, root, pairs) for job, pairs in zip(jobs, overrides)], list(overrides[0])


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    probe = [c for c, _, _ in METRICS if c.startswith("probe/")]
    return [c for c in columns if c not in probe or any(row.get(c) is not None for row in rows)]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    columns = _columns(rows)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])


def write_markdown(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    columns = _columns(rows)
    counts = {status: sum(row.get("status") == status for row in rows) for status in ("failed", "unfinished")}
    summary = f"{len(rows)} runs" + "".join(f", {n} {status}" for status, n in counts.items() if n)
    summary += " (left out of the plot)." if any(counts.values()) else "."
    lines = [f"# Sweep report: {title}", "", summary, "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _sortable(value: Any) -> tuple[float, str]:
    """Numbers in numeric order, then text."""
    number = _number(value)
    return (number if number is not None else math.inf, _cell(value))


def plotted(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that go into the plot: the ``ok`` jobs (a failed or unfinished job would bend the curves)."""
    return [row for row in rows if row.get("status", "ok") == "ok"]


def plot_series(rows: Sequence[dict[str, Any]], swept: Sequence[str]) -> tuple[list[str], dict]:
    """The plot's data: the metrics plotted (rows of the grid) and, per ``(metric, x key)`` panel, the
    points ``(x, y, note, job)`` of each line, keyed by the values of the other ``swept`` keys. Only
    :func:`plotted` rows."""
    rows = plotted(rows)
    metrics = [c for c, _, _ in METRICS if any(_number(row.get(c)) is not None for row in rows)] or ["train/loss"]
    panels: dict[tuple[str, str], dict[tuple, list[tuple[float, float, str, str]]]] = {}
    for metric in metrics:
        for x_key, _ in X_AXES:
            # one line per combination of the swept keys that do not set this x axis
            group_keys = _group_keys(swept, x_key)
            groups = panels.setdefault((metric, x_key), {})
            for row in rows:
                x, y = _number(row.get(x_key)), _number(row.get(metric))
                if x is None or y is None:
                    continue
                note = f"r={_cell(row.get('mask.ratio'))} u={_cell(row.get('mask.unit'))}"
                groups.setdefault(tuple(_sortable(row.get(k)) for k in group_keys), []).append(
                    (x, y, note, str(row.get("job"))))
    return metrics, panels


def _group_keys(swept: Sequence[str], x_key: str) -> list[str]:
    exclude = (x_key,) if x_key != "mask/avg_dist" else ("mask.ratio", "mask.unit")
    return [key for key in swept if key not in exclude]


def write_plot(rows: Sequence[dict[str, Any]], swept: Sequence[str], path: Path, title: str) -> list[str]:
    """The metric x axis grid of the ``ok`` jobs as a PNG (one line per combination of the other ``swept``
    keys); returns the metrics plotted (the rows of the grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, panels = plot_series(rows, swept)
    figure, axes = plt.subplots(len(metrics), len(X_AXES), figsize=(4.2 * len(X_AXES), 3.2 * len(metrics)),
                                squeeze=False)
    for i, metric in enumerate(metrics):
        for j, (x_key, x_label) in enumerate(X_AXES):
            axis = axes[i][j]
            group_keys = _group_keys(swept, x_key)
            groups = panels[(metric, x_key)]
            for values, points in sorted(groups.items()):
                points.sort()
                label = ", ".join(f"{k}={v[1]}" for k, v in zip(group_keys, values)) or "runs"
                style = "o" if x_key == "mask/avg_dist" else "o-"
                axis.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
                if x_key == "mask/avg_dist":  # which mask each point is
                    for x, y, note, _ in points:
                        axis.annotate(note, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            axis.set_xlabel(x_label)
            axis.set_ylabel(metric)
            axis.grid(alpha=0.3)
            if groups and (len(groups) > 1 or group_keys):
                axis.legend(fontsize=7)
    shown = len(plotted(rows))
    left_out = f"; {len(rows) - shown} failed or unfinished left out" if shown < len(rows) else ""
    figure.suptitle(f"{title} ({shown} runs{left_out})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return metrics


def report(root: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write ``sweep_report.csv``, ``.md`` and ``.png`` for the multirun folder ``root`` (into ``out``,
    default ``root``) and return their paths."""
    root = Path(root)
    rows, swept = build_rows(root)
    out_dir = Path(out) if out is not None else root
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"sweep_report.{kind}" for kind in ("csv", "md", "png")}
    write_csv(rows, paths["csv"])
    write_markdown(rows, paths["md"], str(root))
    write_plot(rows, swept, paths["png"], root.name or str(root))
    for row in rows:
        if row["status"] != "ok":
            print(f"sweep_report: job {row['job']}: {row['status']}: {row['reason']}", file=sys.stderr)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", help="the folder of a -m run (hydra.sweep.dir), e.g. multirun/<date>/<time>")
    parser.add_argument("--out", default=None, help="where to write sweep_report.{csv,md,png} (default: multirun_dir)")
    args = parser.parse_args(argv)
    try:
        paths = report(args.multirun_dir, args.out)
    except ReportError as error:
        print(f"sweep_report: error: {error}", file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
