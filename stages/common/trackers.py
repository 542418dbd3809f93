"""Experiment trackers (Weights & Biases, MLflow) as the stages share them: the switches and their keyword blocks
in ``<stage>.exp_manager`` (checked here, one wording), the trackers' packages (imported only when switched on),
and the tracker run ids kept in the stage's results folder.

Why the ids are kept: a job that is killed or preempted and requeued reruns the same command; reading the stored
id back (W&B ``id`` + ``resume="allow"``, MLflow ``run_id``) continues the same tracker run instead of starting a
second one. The file goes when the results folder is set aside (``resume_if_exists=false``), so a fresh start is
a fresh run. The W&B key is never written: W&B reads ``WANDB_API_KEY``, which the job exports from
``wandb_api_key_file``. Torch-free.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from stages.common.checks import boolean
from stages.common.errors import UserError
from stages.common.io import write_json

RUN_IDS = "tracker_runs.json"   # {"wandb": "<run id>", "mlflow": "<run id>"} in the stage's results folder
MLRUNS = "mlruns"               # the local MLflow store when mlflow_logger_kwargs.tracking_uri is null

log = logging.getLogger("promptlaunch")


@dataclass(frozen=True)
class Trackers:
    """Which trackers a stage writes to, with their keyword arguments (None: off)."""

    wandb: dict[str, Any] | None = None
    mlflow: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return self.wandb is not None or self.mlflow is not None


def check_trackers(em: Any, prefix: str) -> Trackers:
    """``<prefix>.create_wandb_logger`` / ``create_mlflow_logger`` (booleans) and their ``*_logger_kwargs``
    (mappings or null); ``prefix`` is the full key path of the ``exp_manager`` block."""
    em = em if em is not None else {}
    out: dict[str, dict[str, Any] | None] = {}
    for name in ("wandb", "mlflow"):
        on = boolean(em.get(f"create_{name}_logger", False), f"{prefix}.create_{name}_logger")
        kwargs = em.get(f"{name}_logger_kwargs")
        if isinstance(kwargs, DictConfig):
            kwargs = OmegaConf.to_container(kwargs, resolve=True)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise UserError(f"{prefix}.{name}_logger_kwargs: must be a mapping of keyword arguments or null, got {kwargs!r:.80}")
        out[name] = dict(kwargs or {}) if on else None
    return Trackers(**out)


def require(name: str, prefix: str) -> Any:
    """The tracker's package (``wandb`` or ``mlflow``), or one line saying how to install it or switch it off."""
    package = {"wandb": "wandb", "mlflow": "mlflow-skinny"}[name]
    try:
        return __import__(name)
    except ImportError:
        raise UserError(f"{prefix}.create_{name}_logger=true but {name} is not installed; `pip install {package}` "
                        f"(or `pip install -e \".[{name}]\"`) or set {prefix}.create_{name}_logger=false") from None


def stored_run_id(folder: Path, tracker: str) -> str | None:
    """The tracker run id this results folder was logged to, or None."""
    try:
        ids = json.loads((Path(folder) / RUN_IDS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = ids.get(tracker) if isinstance(ids, dict) else None
    return value if isinstance(value, str) and value else None


def store_run_id(folder: Path, tracker: str, run_id: str) -> None:
    """Record ``run_id`` for ``tracker`` in the results folder (atomically, keeping the other tracker's id)."""
    path = Path(folder) / RUN_IDS
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        ids = {}
    if not isinstance(ids, dict):
        ids = {}
    if ids.get(tracker) != run_id:
        write_json(path, {**ids, tracker: run_id})


def new_wandb_id() -> str:
    """A fresh W&B run id: 8 lowercase letters and digits, as wandb makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def run_id_for(folder: Path, tracker: str, new: Callable[[], str]) -> str:
    """The stored id, or a new one (``new()``) stored before it is used."""
    found = stored_run_id(folder, tracker)
    if found is None:
        found = new()
        store_run_id(folder, tracker, found)
    return found


def mlflow_tracking_uri(kwargs: dict[str, Any], folder: Path) -> str:
    """``tracking_uri`` as given, else ``$MLFLOW_TRACKING_URI``, else a ``file:`` store in the results folder
    (MLflow's own default, ``./mlruns``, would depend on the directory the job happens to start in). A ``file:``
    store is opted in (``MLFLOW_ALLOW_FILE_STORE``, unless set otherwise)."""
    given = kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    uri = str(given) if given else (Path(folder).resolve() / MLRUNS).as_uri()
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless opted in; a local folder is what offline jobs without a tracking
        # server have (a database store would need SQLAlchemy, which mlflow-skinny does not bring)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def existing_mlflow_run(uri: str, run_id: str | None) -> str | None:
    """``run_id`` if the MLflow store at ``uri`` still has it; None (a new run) when the store was wiped or moved."""
    if run_id is None:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(uri).get_run(run_id)
        return run_id
    except MlflowException:
        log.warning("MLflow run %s (from %s) is not in %s; starting a new run", run_id, RUN_IDS, uri)
        return None


def flat_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict as ``a/b/c`` keys (what a tracker's summary and metrics take)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_numbers(v, f"{prefix}{k}/"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip("/")] = float(obj)
    return out
