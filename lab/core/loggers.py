"""Loggers: a CSV logger that survives a resume, and a W&B logger whose mode does not leak between jobs."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    """Keep an existing metrics.csv and continue it with the same columns."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to metrics.csv instead of replacing it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def drop_rows_from_step(run_dir: Path, step: int) -> None:
    """Remove CSV metric rows logged at or after `step`: a resumed run logs those steps again."""
    for path in Path(run_dir).glob("**/metrics.csv"):
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            fieldnames = reader.fieldnames or []
            rows = [row for row in reader if not row.get("step") or int(row["step"]) < step]
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, with the W&B mode given to `wandb.init` for this run only.

    Lightning's `offline=True` sets os.environ["WANDB_MODE"] for the whole process (lightning 2.6), so in a
    multirun every later job inherited it whatever its own config said. Here `mode` (online, offline, disabled;
    None follows WANDB_MODE) applies to this run alone, and `offline=True` means mode="offline".
    """

    def __init__(self, mode: str | None = None, offline: bool = False, **kwargs):
        super().__init__(offline=False, mode="offline" if offline else mode, **kwargs)
