"""The preemption signal (SIGUSR1 by default) only sets a flag; ``LastCheckpoint`` acts on it at a step boundary.
SIGTERM and SIGINT (a closed terminal, Ctrl-C, ``kill``, the launcher passing them on, ``scancel``) do the same,
without the requeue: checkpoint at the next step boundary and exit. A second Ctrl-C stops at once.

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
    """The stop signals only set this flag (signal-safe); the trainer acts on it at a step boundary. ``signum`` is
    the preemption signal (checkpoint and requeue); ``received`` the signal that actually came."""

    def __init__(self) -> None:
        self.signum = preempt_signal()
        self.requested = False
        self.received: signal.Signals | None = None

    @property
    def requeue(self) -> bool:
        """Only the preemption signal asks for a requeue; SIGTERM/SIGINT ask to stop."""
        return self.received in (None, self.signum)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in {self.signum, signal.SIGTERM, signal.SIGINT}:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.requested and sig == signal.SIGINT and self.received == signal.SIGINT:   # Ctrl-C twice: stop now
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        if not self.requested:
            again = "; Ctrl-C again stops without it" if sig == signal.SIGINT else ""
            os.write(2, f"promptlaunch: received {sig.name}; checkpointing at the next step boundary{again}\n".encode())
            self.received = sig
        self.requested = True


_FLAG: PreemptionFlag | None = None


def install_preemption_handler() -> PreemptionFlag:
    """Called first thing in train(): from then on the preemption signal no longer kills the process."""
    global _FLAG
    if _FLAG is None:
        _FLAG = PreemptionFlag()
    _FLAG.requested = False
    _FLAG.received = None
    _FLAG.install()
    return _FLAG
