"""Fault tolerance of the prompt-learning stage: kill it anywhere, rerun the same command, get the same prompt.

A kill at any moment (``kill -9``, the OOM killer, a node failure, a Slurm time limit) costs at most the steps
since the last checkpoint; the rerun resumes from ``last.ckpt`` and ends with the same prompt, bit for bit on
CPU, as an uninterrupted run. The pieces, one module each, composed for one run by :class:`FaultTolerance`
(``tolerance.py``), which the recipe (``train.py``) wires into the trainer:

* ``checkpoint_io.py`` -- :class:`AtomicCheckpointIO` writes every checkpoint to a hidden temporary file in the
  checkpoint folder, fsyncs it and renames it over the target (``stages.common.io.atomic_path``); before
  ``last.ckpt`` is replaced, the previous one is copied (atomically too) to ``last.prev.ckpt``.
* ``../identity.py`` -- the run identity: every setting that determines the result (the config minus where things go
  and how often to log, with the base model's and the data files' content in place of their paths, and the
  batching actually used). It is in every checkpoint and in the artifact.
* ``resume.py`` -- :func:`select_resume` loads and checks ``last.ckpt`` before training (complete, readable the
  way Lightning reads it, the same prompt shapes, the same run identity). A corrupt or truncated one falls back to
  ``last.prev.ckpt`` with a warning naming both; if neither is usable, or the checkpoint belongs to another run,
  the run stops with one line listing what changed and the ways on (a new ``run.name``,
  ``resume_if_exists=false``, or ``exp_manager.resume_ignore_changes=[keys]``).
* ``state.py`` -- :class:`ResumeState` stores, in every checkpoint, the RNG states (torch CPU/CUDA, Python,
  NumPy, per rank), the run identity and the data position (epoch, batches consumed). The RNG is restored right
  before the first resumed batch; the batch position is restored by the module's sampler skip.
* ``last_checkpoint.py`` -- :class:`LastCheckpoint` owns ``last.ckpt``: written at optimizer-step boundaries
  every ``exp_manager.checkpoint_callback_params.every_n_train_steps`` steps, after each validation and at the
  end of training (``ModelCheckpoint`` keeps only the top-k by val_loss).
* ``preemption.py`` -- SIGUSR1 (Slurm's ``--signal=USR1@<secs>`` before the time limit, or
  ``scancel --signal=USR1``) only sets a flag (:class:`PreemptionFlag`, installed first thing by the recipe). At
  the next step boundary (after the validation that step triggers, if any) all ranks agree, save ``last.ckpt``,
  rank 0 leaves the requeue marker named by ``$PROMPTLAUNCH_REQUEUE_FILE`` (exported by the sbatch script) and
  every rank exits with code 3. The sbatch script then runs ``scontrol requeue``; the requeued job resumes from
  ``last.ckpt``.
* ``csv_logger.py`` -- :func:`atomic_csv_logger`, Lightning's CSVLogger with ``metrics.csv`` rewritten whole and
  atomically.

The names below are re-exported so ``from stages.prompt_learning.fault import X`` keeps working.
"""
from __future__ import annotations

from .checkpoint_io import LAST, PREV, AtomicCheckpointIO, keep_previous
from .csv_logger import atomic_csv_logger
from .last_checkpoint import LastCheckpoint
from .preemption import PREEMPT_EXIT, REQUEUE_ENV, SIGNAL_ENV, Preempted, PreemptionFlag, install_preemption_handler, preempt_signal
from .resume import FIX, Resume, check_compatible, load_checkpoint_file, select_resume
from .state import STATE_KEY, ResumeState, capture_rng, restore_rng
from .tolerance import FaultTolerance

__all__ = [
    "FIX", "LAST", "PREEMPT_EXIT", "PREV", "REQUEUE_ENV", "SIGNAL_ENV", "STATE_KEY",
    "AtomicCheckpointIO", "FaultTolerance", "LastCheckpoint", "Preempted", "PreemptionFlag", "Resume", "ResumeState",
    "atomic_csv_logger", "capture_rng", "check_compatible", "install_preemption_handler", "keep_previous",
    "load_checkpoint_file", "preempt_signal", "restore_rng", "select_resume",
]
