"""Metric logging to ``metrics.csv`` (always) and TensorBoard (optional).

Design choices
- One wide CSV per run: a ``step`` column plus one column per metric name, rows written as they come (train
  rows and eval rows share the file; a metric absent from a row is an empty cell). When a new metric name
  appears the file is rewritten once with the wider header, so it always parses with ``csv.DictReader`` /
  ``pandas.read_csv``.
- Resuming from step S first drops rows with step > S (they belong to the part of the run that is being
  replayed), so the log of a resumed run equals the log of an uninterrupted one. TensorBoard gets the same
  treatment through ``purge_step``.
- Values must already be Python numbers: converting tensors here would hide host syncs in the caller.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.csv"


class MetricLogger:
    """``log(step, {"train/loss": 2.3, ...})`` appends a CSV row and TensorBoard scalars."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / METRICS_FILE
        self.fields: list[str] = ["step"]
        rows = self._read_rows()
        if rows is not None and resume_step is None:  # fresh run: start an empty log
            self.fields = ["step"]
            self._rewrite([])
        elif rows is not None:
            self._rewrite([r for r in rows if _row_step(r) <= resume_step])
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in the tensorboard package

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=purge)

    def _read_rows(self) -> list[dict[str, str]] | None:
        if not self.csv_path.is_file():
            return None
        with open(self.csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            self.fields = list(reader.fieldnames or ["step"])
            return list(reader)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.csv_path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r} must be a Python number, got {type(value).__name__}")
            row[key] = value
        new = [k for k in row if k not in self.fields]
        if new:
            old_rows = self._read_rows() or []
            self.fields = self.fields + new
            self._rewrite(old_rows)
        with open(self.csv_path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields).writerow(row)
        if self._tb is not None:
            for key, value in metrics.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _row_step(row: dict[str, str]) -> int:
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return -1


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` as dicts of floats (empty cells omitted)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
