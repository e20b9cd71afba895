"""Loggers that keep a run's history when it resumes into the same run folder."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; this one appends to it, starting
    from the existing header so old and new columns are both kept."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as stream:
                header = next(csv.reader(stream), [])
            self.metrics_keys = sorted(set(header))

    def _check_log_dir_exists(self) -> None:
        return None


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to ``metrics.csv`` when a run resumes (``resume=auto``) in its folder.

    Steps logged after the checkpoint the run resumed from appear twice; the later rows are the ones
    that count (filter by the last occurrence of each step).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
