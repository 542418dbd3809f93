"""Fault tolerance of the prompt-learning stage: kill it anywhere, rerun the same command, get the same prompt.

A kill at any moment (``kill -9``, the OOM killer, a node failure, a Slurm time limit) costs at most the steps
since the last checkpoint; the rerun resumes from ``last.ckpt`` and ends with the same prompt, bit for bit on
CPU, as an uninterrupted run. The pieces, wired in by ``train.py`` through :class:`FaultTolerance`:

* :class:`AtomicCheckpointIO` writes every checkpoint to a hidden temporary file in the checkpoint folder,
  fsyncs it and renames it over the target (``stages.common.io.atomic_path``); before ``last.ckpt`` is replaced,
  the previous one is copied (atomically too) to ``last.prev.ckpt``. Lightning's own writer is
  not enough: it goes through an fsspec transaction that writes the temporary file into the *system* temp
  folder and then moves it, which across filesystems (``/tmp`` vs. a results mount) is a copy into the final
  path, so a kill mid-copy leaves a truncated ``last.ckpt``; it never fsyncs either.
* :func:`select_resume` loads and checks ``last.ckpt`` before training (complete, readable the way Lightning
  reads it, written for the same data/batch layout and prompt shapes). A corrupt or truncated one falls back
  to ``last.prev.ckpt`` with a warning naming both; if neither is usable, or the checkpoint belongs to another
  configuration, the run stops with one line saying what to delete or which key to set.
* :class:`ResumeState` stores, in every checkpoint, the RNG states (torch CPU/CUDA, Python, NumPy, per rank)
  and the data position (epoch, batches consumed, and the sampler layout they refer to). The RNG is restored
  right before the first resumed batch; the batch position is restored by the module's sampler skip.
* :class:`LastCheckpoint` owns ``last.ckpt``: written at optimizer-step boundaries every
  ``exp_manager.checkpoint_callback_params.every_n_train_steps`` steps, after each validation and at the end
  of training (``ModelCheckpoint`` keeps only the top-k by val_loss).
* Preemption: SIGUSR1 (Slurm's ``--signal=USR1@<secs>`` before the time limit, or ``scancel --signal=USR1``)
  only sets a flag (:class:`PreemptionFlag`, installed first thing in ``train()``). At the next step boundary
  (after the validation that step triggers, if any) all ranks agree, save ``last.ckpt``, rank 0 leaves the
  requeue marker named by ``$PROMPTLAUNCH_REQUEUE_FILE`` (exported by the sbatch script) and every rank exits
  with code 3. The sbatch script then runs ``scontrol requeue``; the requeued job resumes from ``last.ckpt``.
  Saving inside the signal handler instead (Lightning's ``SLURMEnvironment(auto_requeue=True)``) could catch
  the trainer halfway through an optimizer step, and its ``scontrol`` call runs inside the task (often a
  container without Slurm's tools).
"""
from __future__ import annotations

import csv
import io as _io
import logging
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.trainer.states import TrainerFn

from stages.common.errors import UserError
from stages.common.io import atomic_path, remove_stale_tmp

log = logging.getLogger("promptlaunch.prompt_learning")

LAST = "last.ckpt"
PREV = "last.prev.ckpt"
PREEMPT_EXIT = 3
REQUEUE_ENV = "PROMPTLAUNCH_REQUEUE_FILE"
SIGNAL_ENV = "PROMPTLAUNCH_PREEMPT_SIGNAL"
STATE_KEY = "promptlaunch.ResumeState"
FIX = "delete {dir} to start over, or set exp_manager.resume_if_exists=false"
LAYOUT_DEFAULTS: dict[str, Any] = {"batching": None}   # layout keys written only when not plain (train._batching_layout)


# ---- atomic checkpoint files -------------------------------------------------------------------------

class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file next to the target, fsync, rename; keep the previous last.ckpt."""

    def __init__(self) -> None:
        super().__init__()
        # last.ckpt files known to be good: written by this process, or checked by select_resume. Only those
        # become last.prev.ckpt, so a corrupt or foreign last.ckpt never replaces a good fallback.
        self.trusted: set[str] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options")
        target = Path(os.path.abspath(str(path)))
        if target.name == LAST and str(target) in self.trusted and target.is_file():
            keep_previous(target)
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
        if target.name == LAST:
            self.trusted.add(str(target))


def keep_previous(last: Path) -> Path:
    """Make ``last.prev.ckpt`` a copy of the current ``last.ckpt`` (copy to a temporary name, fsync, rename).

    A copy, not a hard link: a link would share the file's data, so damage done to ``last.ckpt`` in place (a
    truncating copy over it, a bad block) would take the fallback with it. Prompt-only checkpoints are small.
    """
    prev = last.with_name(PREV)
    with atomic_path(prev) as tmp:
        shutil.copyfile(last, tmp)
    return prev


# ---- choosing the checkpoint to resume from ------------------------------------------------------------

@dataclass
class Resume:
    path: str | None = None
    step: int = 0
    fallback_from: str | None = None   # the unusable last.ckpt, when resuming from last.prev.ckpt


def load_checkpoint_file(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(checkpoint, '') or (None, why it cannot be used); read the way Lightning reads it (weights_only)."""
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unreadable file, ...
        first = " ".join(str(exc).split()).split(". ")[0]
        return None, f"{type(exc).__name__}: {first[:120]}"
    if not isinstance(ck, dict):
        return None, f"holds a {type(ck).__name__}, not a Lightning checkpoint"
    missing = [k for k in ("state_dict", "optimizer_states", "loops", "global_step", "callbacks") if k not in ck]
    if missing:
        return None, f"incomplete Lightning checkpoint (no {', '.join(missing)})"
    return ck, ""


def check_compatible(ck: dict[str, Any], path: Path, layout: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """A readable checkpoint of another configuration: one line naming the difference (no fallback helps)."""
    fix = FIX.format(dir=path.parent)
    got = {k: tuple(v.shape) for k, v in ck["state_dict"].items() if hasattr(v, "shape")}
    if set(got) != set(shapes) or any(got[k] != shapes[k] for k in shapes):
        diff = sorted(set(got) ^ set(shapes)) or [k for k in shapes if got[k] != shapes[k]]
        k = diff[0]
        raise UserError(f"{path}: checkpoint does not match this config (prompt parameter {k}: checkpoint "
                        f"{got.get(k, 'absent')}, config {shapes.get(k, 'absent')}); {fix}")
    saved = (ck["callbacks"].get(STATE_KEY) or {}).get("layout")
    if saved is None:   # written before checkpoints carried it: the batch position is restored, the RNG is not
        log.warning("%s has no data layout or RNG state (an older promptlaunch wrote it); resuming anyway, but the result "
                    "may differ slightly from an uninterrupted run if training draws random numbers (dropout)", path)
        return
    for key in [*layout, *(k for k in saved if k not in layout)]:   # a key absent on one side: its default
        want = layout.get(key, LAYOUT_DEFAULTS.get(key))
        if saved.get(key, LAYOUT_DEFAULTS.get(key)) != want:
            raise UserError(f"{path}: checkpoint was written with {key}={saved.get(key)!r}, this config gives "
                            f"{want!r}, so the resumed run would not see the same batches; {fix}")


def select_resume(ckpt_dir: Path, layout: dict[str, Any], shapes: dict[str, tuple[int, ...]], rank: int = 0) -> Resume:
    """The checkpoint to resume from (None: start from scratch); see the module docstring."""
    if rank == 0:
        for p in remove_stale_tmp(ckpt_dir):
            log.info("removed %s, left by a write that was interrupted", p)
    last = ckpt_dir / LAST
    if not last.is_file():
        return Resume()
    bad: list[tuple[Path, str]] = []
    for cand in (last, ckpt_dir / PREV):
        if cand == last or cand.is_file():
            ck, why = load_checkpoint_file(cand)
            if ck is None:
                bad.append((cand, why))
                continue
            check_compatible(ck, cand, layout, shapes)
            step = int(ck.get("global_step", 0))
            if bad:
                log.warning("%s is unusable (%s); resuming from the previous good checkpoint %s (step %d)",
                            bad[0][0], bad[0][1], cand, step)
            return Resume(str(cand), step, str(bad[0][0]) if bad else None)
    detail = "; ".join(f"{p.name}: {why}" for p, why in bad)
    prev_note = "" if len(bad) > 1 else f" and there is no {PREV} to fall back to"
    raise UserError(f"{last}: checkpoint is corrupt or truncated ({detail}){prev_note}; {FIX.format(dir=ckpt_dir)}")


# ---- RNG state and data position in every checkpoint -----------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """All RNG states a training step may draw from, in types ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _dist_world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


class ResumeState(pl.Callback):
    """RNG states (one per rank) and the data position in every checkpoint; RNG restored before the first
    resumed batch, so nothing that runs between the restore and that batch can shift the random stream."""

    def __init__(self, layout: dict[str, Any]) -> None:
        self.layout = dict(layout)
        self._pending: dict[str, Any] | None = None
        self._trainer: Any = None

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        rng = capture_rng()
        if _dist_world() > 1:   # every rank dumps the checkpoint; rank 0 writes what all of them gathered
            ranks: list[Any] = [None] * _dist_world()
            torch.distributed.all_gather_object(ranks, rng)
        else:
            ranks = [rng]
        t = self._trainer
        module = t.lightning_module if t is not None else None
        position = {
            "epoch": int(t.current_epoch) if t is not None else 0,
            "batches_in_epoch": int(getattr(module, "epoch_batches", 0)),
            "global_step": int(t.global_step) if t is not None else 0,
        }
        return {"rng": ranks, "layout": dict(self.layout), "position": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("rng") or []
        rank = int(self._trainer.global_rank) if self._trainer is not None else 0
        self._pending = ranks[rank] if rank < len(ranks) else (ranks[0] if ranks else None)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None


# ---- last.ckpt: every N steps, after each validation, at the end, and on the preemption signal -------------

class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint; the process exits with PREEMPT_EXIT."""

    def __init__(self) -> None:
        super().__init__(PREEMPT_EXIT)


def preempt_signal() -> signal.Signals:
    name = os.environ.get(SIGNAL_ENV, "USR1").upper()
    name = name if name.startswith("SIG") else "SIG" + name
    return signal.Signals[name] if name in signal.Signals.__members__ else signal.SIGUSR1


class PreemptionFlag:
    """The preemption signal only sets this flag (signal-safe); the trainer acts on it at a step boundary."""

    def __init__(self) -> None:
        self.signum = preempt_signal()
        self.requested = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.requested:
            os.write(2, f"promptlaunch: received {signal.Signals(signum).name}; checkpointing at the next step "
                        f"boundary\n".encode())
        self.requested = True


_FLAG: PreemptionFlag | None = None


def install_preemption_handler() -> PreemptionFlag:
    """Called first thing in train(): from then on the preemption signal no longer kills the process."""
    global _FLAG
    if _FLAG is None:
        _FLAG = PreemptionFlag()
    _FLAG.requested = False
    _FLAG.install()
    return _FLAG


class LastCheckpoint(Checkpoint):
    """Owns ``last.ckpt``, the file a rerun resumes from; ``ModelCheckpoint`` keeps only the top-k by val_loss.

    Written at optimizer-step boundaries only (never between the micro-batches of one step): every
    ``every_n_train_steps`` steps (if set), after every validation, when training ends, and when the preemption
    signal arrived. A save due at a step that triggers validation waits until after it, so a resumed run does not
    have to repeat that validation. (``ModelCheckpoint`` cannot do this job: with a monitored metric it writes
    ``last.ckpt`` only when the metric is fresh and improved, so a run could go many steps without one.)
    Being a ``Checkpoint``, Lightning runs it after ``ModelCheckpoint``, so the top-k bookkeeping of a
    validation is in the file.
    """

    def __init__(self, ckpt_dir: Path, every_n_train_steps: int | None, flag: PreemptionFlag) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.every = int(every_n_train_steps) if every_n_train_steps else None
        self.flag = flag
        self.resumed_step = 0
        self._saved_step = -1
        self._after_validation = False

    @property
    def state_key(self) -> str:
        return "promptlaunch.LastCheckpoint"

    def _agreed(self, trainer: Any) -> bool:
        if trainer.world_size > 1:   # every rank reaches the same boundaries, so this collective is symmetric
            return bool(trainer.strategy.reduce_boolean_decision(self.flag.requested, all=False))
        return self.flag.requested

    def save(self, trainer: Any) -> None:
        trainer.save_checkpoint(str(self.ckpt_dir / LAST))
        self._saved_step = int(trainer.global_step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._saved_step = int(trainer.global_step)   # the step resumed from (or 0) is on disk already
        if self._agreed(trainer):
            self._stop(trainer, saved=False)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        should_acc = getattr(trainer.fit_loop, "_should_accumulate", None)
        if should_acc is not None and should_acc():
            return          # between micro-batches of one optimizer step: gradients are not in checkpoints
        step = int(trainer.global_step)
        preempt = self._agreed(trainer)
        periodic = self.every is not None and step % self.every == 0
        if not (preempt or periodic) or step == self._saved_step:
            return
        if trainer.fit_loop.epoch_loop._is_training_done:
            return          # the last step: on_train_end saves, and finishing beats a requeue
        if _validation_follows(trainer):
            self._after_validation = True      # on_validation_end saves (and stops, if preempted)
            return
        self.save(trainer)
        if preempt:
            self._stop(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        self._after_validation = False
        preempt = self._agreed(trainer)
        if int(trainer.global_step) != self._saved_step:
            self.save(trainer)
        if preempt and not trainer.fit_loop.epoch_loop._is_training_done:
            self._stop(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if int(trainer.global_step) != self._saved_step:
            self.save(trainer)   # a kill while the artifact is written then costs no training at all

    def _stop(self, trainer: Any, saved: bool = True) -> None:
        step = int(trainer.global_step)
        name = self.flag.signum.name
        marker = os.environ.get(REQUEUE_ENV)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if trainer.is_global_zero:
            what = f"checkpoint saved at step {step} to {self.ckpt_dir / LAST}" if saved else "nothing new to save"
            if marker and step == self.resumed_step and restarts > 0:
                log.error("%s: %s, and no step completed since the job was requeued; not requeueing again (that "
                          "loop would make no progress): raise run.time_limit or lower the lead time in "
                          "cluster.signal", name, what)
            elif marker:
                from stages.common.io import write_text

                write_text(marker, f"{step}\n")
                log.warning("%s: %s; the job script requeues the job, which resumes from it", name, what)
            else:
                log.warning("%s: %s; rerun the same command to resume", name, what)
        raise Preempted()


def _validation_follows(trainer: Any) -> bool:
    """Whether Lightning runs validation right after the current training batch (private loop API)."""
    try:
        n_val = trainer.num_val_batches
        n_val = sum(n_val) if isinstance(n_val, list) else n_val
        el = trainer.fit_loop.epoch_loop
        return bool(n_val) and bool(el._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except Exception:  # a Lightning without these internals: save right away
        return False


# ---- metrics.csv written atomically ---------------------------------------------------------------------

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


# ---- what train.py uses ---------------------------------------------------------------------------------

class FaultTolerance:
    """Plugins, callbacks, logger and the resume decision for one prompt-learning run."""

    def __init__(self, log_dir: Path, layout: dict[str, Any], every_n_train_steps: int | None = None,
                 flag: PreemptionFlag | None = None) -> None:
        self.ckpt_dir = Path(log_dir) / "checkpoints"
        self.layout = dict(layout)
        self.checkpoint_io = AtomicCheckpointIO()
        self.resume_state = ResumeState(layout)
        self.last = LastCheckpoint(self.ckpt_dir, every_n_train_steps, flag or install_preemption_handler())
        self.resumed = Resume()

    def callbacks(self) -> list[Any]:
        return [self.resume_state, self.last]

    def plugins(self) -> list[Any]:
        """Atomic checkpoint IO; under srun, Lightning's SLURM environment without its own SIGUSR1 requeue."""
        from lightning_fabric.plugins.environments import SLURMEnvironment

        plugins: list[Any] = [self.checkpoint_io]
        if SLURMEnvironment.detect():
            plugins.append(SLURMEnvironment(auto_requeue=False))
        return plugins

    def logger(self, save_dir: str) -> Any:
        return atomic_csv_logger(save_dir, lambda: self.resumed.step)

    def resume_path(self, module: Any, rank: int, resume_if_exists: bool) -> str | None:
        """The checkpoint to pass to ``trainer.fit(ckpt_path=...)``; None starts from scratch."""
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith("base_model.")}
        if not resume_if_exists:
            if (self.ckpt_dir / LAST).is_file():
                log.info("exp_manager.resume_if_exists=false: starting over; %s will be overwritten", self.ckpt_dir / LAST)
            if rank == 0:
                remove_stale_tmp(self.ckpt_dir)
            return None
        self.resumed = select_resume(self.ckpt_dir, self.layout, shapes, rank)
        if self.resumed.path is not None:
            if Path(self.resumed.path).name == LAST:
                self.checkpoint_io.trusted.add(os.path.abspath(self.resumed.path))
            self.last.resumed_step = self.resumed.step
            restarts = os.environ.get("SLURM_RESTART_COUNT")
            log.info("resuming from %s (step %d)%s", self.resumed.path, self.resumed.step,
                     f"; Slurm restart {restarts}" if restarts else "")
        return self.resumed.path
