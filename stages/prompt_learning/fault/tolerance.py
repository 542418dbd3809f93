"""``FaultTolerance``: the one object the recipe asks for plugins, callbacks, the CSV logger and the checkpoint
to resume from; it composes the pieces of this package for one run."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence


from .checkpoint_io import LAST, AtomicCheckpointIO
from .csv_logger import atomic_csv_logger
from .last_checkpoint import LastCheckpoint
from .preemption import PreemptionFlag, install_preemption_handler
from .resume import Resume, select_resume
from .state import ResumeState

log = logging.getLogger("promptlaunch.prompt_learning")


class FaultTolerance:
    """Plugins, callbacks, logger and the resume decision for one prompt-learning run."""

    def __init__(self, log_dir: Path, identity: dict[str, Any], every_n_train_steps: int | None = None,
                 flag: PreemptionFlag | None = None, ignore: Sequence[str] = ()) -> None:
        self.ckpt_dir = Path(log_dir) / "checkpoints"
        self.identity = dict(identity)
        self.ignore = list(ignore)
        self.checkpoint_io = AtomicCheckpointIO()
        self.resume_state = ResumeState(identity)
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
        if not resume_if_exists:   # the previous outputs were set aside (set_aside.py)
            return None
        self.resumed = select_resume(self.ckpt_dir, self.identity, shapes, rank, self.ignore)
        if self.resumed.path is not None:
            if Path(self.resumed.path).name == LAST:
                self.checkpoint_io.trusted.add(os.path.abspath(self.resumed.path))
            self.last.resumed_step = self.resumed.step
            restarts = os.environ.get("SLURM_RESTART_COUNT")
            log.info("resuming from %s (step %d)%s", self.resumed.path, self.resumed.step,
                     f"; Slurm restart {restarts}" if restarts else "")
        return self.resumed.path
