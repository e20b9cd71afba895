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

Exit status 2 with a one-line message when the folder holds no job.
"""

from __future__ import annotations

import argparse
import csv
import math
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
    plus ``step`` (the largest logged step)."""
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
                if key == "step":
                    values["step"] = max(values.get("step", value), value)
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


def job_row(job: Path, root: Path, overrides: dict[str, str]) -> dict[str, Any]:
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
    row["status"] = "ok" if "train/loss" in metrics else "no metrics"
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
    lines = [f"# Sweep report: {title}", "", f"{len(rows)} runs.", "",
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


def write_plot(rows: Sequence[dict[str, Any]], swept: Sequence[str], path: Path, title: str) -> list[str]:
    """The metric x axis grid as a PNG (one line per combination of the other ``swept`` keys); returns the
    metrics plotted (the rows of the grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c, _, _ in METRICS if any(_number(row.get(c)) is not None for row in rows)]
    if not metrics:
        metrics = ["train/loss"]
    figure, axes = plt.subplots(len(metrics), len(X_AXES), figsize=(4.2 * len(X_AXES), 3.2 * len(metrics)),
                                squeeze=False)
    for i, metric in enumerate(metrics):
        for j, (x_key, x_label) in enumerate(X_AXES):
            axis = axes[i][j]
            # one line per combination of the swept keys that do not set this x axis
            exclude = (x_key,) if x_key != "mask/avg_dist" else ("mask.ratio", "mask.unit")
            group_keys = [key for key in swept if key not in exclude]
            groups: dict[tuple, list[tuple[float, float, str]]] = {}
            for row in rows:
                x, y = _number(row.get(x_key)), _number(row.get(metric))
                if x is None or y is None:
                    continue
                note = f"r={_cell(row.get('mask.ratio'))} u={_cell(row.get('mask.unit'))}"
                groups.setdefault(tuple(_sortable(row.get(k)) for k in group_keys), []).append((x, y, note))
            for values, points in sorted(groups.items()):
                points.sort()
                label = ", ".join(f"{k}={v[1]}" for k, v in zip(group_keys, values)) or "runs"
                style = "o" if x_key == "mask/avg_dist" else "o-"
                axis.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
                if x_key == "mask/avg_dist":  # which mask each point is
                    for x, y, note in points:
                        axis.annotate(note, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            axis.set_xlabel(x_label)
            axis.set_ylabel(metric)
            axis.grid(alpha=0.3)
            if groups and (len(groups) > 1 or group_keys):
                axis.legend(fontsize=7)
    figure.suptitle(f"{title} ({len(rows)} runs)")
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
