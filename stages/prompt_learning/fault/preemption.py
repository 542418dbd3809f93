"""The preemption signal (SIGUSR1 by default) only sets a flag; ``LastCheckpoint`` acts on it at a step boundary.

Saving inside the signal handler instead (Lightning's ``SLURMEnvironment(auto_requeue=True)``) could catch the
trainer halfway through an optimizer step, and its ``scontrol`` call runs inside the task (often a container
without Slurm's tools).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

PREEMPT_EXIT = 3
REQUEUE_ENV = "PROMPTLAUNCH_REQUEUE_FILE"
SIGNAL_ENV = "PROMPTLAUNCH_PREEMPT_SIGNAL"


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
