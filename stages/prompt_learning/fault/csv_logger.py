"""``metrics.csv`` written whole and atomically, keeping the interrupted run's rows up to the resumed step."""
from __future__ import annotations

import csv
import io as _io
import os
from typing import Any, Callable

from stages.common.io import atomic_path


def atomic_csv_logger(save_dir: str, resume_step: Callable[[], int]) -> Any:
    """Lightning's CSVLogger, but metrics.csv (and hparams.yaml) are rewritten whole and atomically.

    Lightning appends to metrics.csv and rewrites it in place when a new column appears, so a kill can leave
    half a row or half a file; it also deletes the file when a run resumes. Here the file keeps the rows of
    the interrupted run up to the resumed step, then this run's rows.
    """
    from pytorch_lightning.core.saving import save_hparams_to_yaml
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    class Writer(ExperimentWriter):
        def __init__(self, log_dir: str) -> None:
            self.metrics = []
            self.metrics_keys = []
            self.hparams = {}
            self.log_dir = log_dir
            self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
            os.makedirs(log_dir, exist_ok=True)
            self._rows: list[dict[str, Any]] | None = None

        def _earlier_rows(self) -> list[dict[str, Any]]:
            keep = resume_step()
            if keep <= 0 or not os.path.isfile(self.metrics_file_path):
                return []
            try:
                with open(self.metrics_file_path, newline="", encoding="utf-8") as fh:
                    rows = list(csv.DictReader(fh))
            except (OSError, csv.Error, UnicodeDecodeError):
                return []
            return [{k: v for k, v in r.items() if v not in ("", None) and k is not None} for r in rows
                    if str(r.get("step", "")).isdigit() and int(r["step"]) < keep]

        def save(self) -> None:
            if self._rows is None:
                self._rows = self._earlier_rows()
            if not self.metrics:
                return
            self._rows += self.metrics
            self.metrics = []
            keys = sorted(set().union(*self._rows))
            buf = _io.StringIO()
            w = csv.DictWriter(buf, fieldnames=keys)
            w.writeheader()
            w.writerows(self._rows)
            with atomic_path(self.metrics_file_path, suffix=".csv") as tmp:
                tmp.write_text(buf.getvalue(), encoding="utf-8")

        def log_hparams(self, params: dict[str, Any]) -> None:
            self.hparams.update(params)
            path = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
            with atomic_path(path, suffix=".yaml") as tmp:
                save_hparams_to_yaml(str(tmp), self.hparams)

    class AtomicCSVLogger(CSVLogger):
        @property
        def experiment(self) -> Any:
            if self._experiment is None:
                self._experiment = Writer(self.log_dir)
            return self._experiment

    return AtomicCSVLogger(save_dir=save_dir, name="", version="csv")

