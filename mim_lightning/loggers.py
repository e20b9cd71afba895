"""Loggers that keep a run's history when it resumes into the same run folder."""

from __future__ import annotations

import csv
import io
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def _step(row: dict) -> float | None:
    try:
        return float(row.get("step") or "")
    except ValueError:
        return None


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; this one appends to it, starting
    from the existing header so old and new columns are both kept.

    At the first metrics this process logs, at step ``S``, the file's rows of steps ``>= S`` (and a
    last row cut short by a kill) are dropped: they are the steps after the checkpoint the run
    resumed from, which this run logs again. Steps are logged in order, and a resumed run logs at
    its resumed step first (the step's own metrics, the monitor's mask statistics).
    """

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._resumed = False
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as stream:
                header = next(csv.reader(stream), [])
            self.metrics_keys = sorted(set(header))

    def _check_log_dir_exists(self) -> None:
        return None

    def log_metrics(self, metrics_dict: dict, step: int | None = None) -> None:
        if not self._resumed:
            self._resumed = True
            self.drop_rows_from(len(self.metrics) if step is None else step)
        super().log_metrics(metrics_dict, step)

    def drop_rows_from(self, step: int) -> int:
        """Remove the rows of steps ``>= step`` (and unreadable or truncated rows) from the file;
        returns how many were removed."""
        if not self._fs.isfile(self.metrics_file_path):
            return 0
        with self._fs.open(self.metrics_file_path, "r", newline="") as stream:
            original = stream.read()
        text = original
        if text and not text.endswith("\n"):  # a row cut short by a kill -9
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        kept = [row for row in rows if None not in row and (s := _step(row)) is not None and s < step]
        removed = len(rows) - len(kept)
        if removed == 0 and text == original:
            return 0
        if not reader.fieldnames:  # not even a whole header: start the file afresh
            self._fs.rm_file(self.metrics_file_path)
            self.metrics_keys = []
            return removed
        tmp = f"{self.metrics_file_path}.{os.getpid()}.tmp"
        with self._fs.open(tmp, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=reader.fieldnames or self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        self._fs.mv(tmp, self.metrics_file_path)
        return removed


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to ``metrics.csv`` when a run resumes (``resume=auto``) in its folder.

    The rows of the steps after the checkpoint the run resumed from (logged before the interruption)
    are dropped when the resumed run logs its first step, so the file has each step once. Rows are
    written as they are logged: Lightning saves after each of its own logging calls, and
    ``flush_logs_every_n_steps=1`` does the same for rows callbacks log directly (learning rates, the
    mask statistics), so a kill -9 loses no row before the checkpoint.
    """

    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs) -> None:
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
