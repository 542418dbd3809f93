"""Run a stage entry file with faults injected at exact points, for the kill/resume and preemption tests.

    python tests/support/fault_runner.py [--kill-after-step N] [--kill-mid-save N] [--kill-in-keep-previous N]
                                 [--kill-in-artifact] [--usr1-after-step N] [--signal-after-step NAME:N] [--step-sleep S] [--] [-u] ENTRY ARGS...

Counts are per process, 1-based. ``--kill-*`` sends SIGKILL to this very process (no cleanup, no atexit,
exactly what ``kill -9`` or the OOM killer does):
  --kill-after-step N         right after the N-th optimizer step updated the prompt, before Lightning counts it
  --kill-mid-save N           in the N-th save of last.ckpt, after half of its bytes reached the file
  --kill-in-keep-previous N   in the N-th last.ckpt -> last.prev.ckpt hand-over (half copied, not renamed)
  --kill-in-artifact          after the artifact's prompt table is written, before the artifact folder is renamed
``--usr1-after-step N`` sends SIGUSR1 to this process after the N-th optimizer step (a Slurm preemption notice);
``--signal-after-step NAME:N`` sends signal NAME (TERM, INT, ...) after the N-th optimizer step;
``--step-sleep S`` sleeps S seconds after every optimizer step (slow training down for a test that must catch it).
The rest of the command line (``-u`` is accepted and ignored) is the entry file and its arguments, so a
one-line wrapper script can stand in for ``python`` in a job script.
"""
from __future__ import annotations

import argparse
import io
import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kill-after-step", type=int)
    p.add_argument("--kill-mid-save", type=int)
    p.add_argument("--kill-in-keep-previous", type=int)
    p.add_argument("--kill-in-artifact", action="store_true")
    p.add_argument("--usr1-after-step", type=int)
    p.add_argument("--signal-after-step", default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    opts, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a not in ("--", "-u")]
    entry, args = rest[0], rest[1:]
    sys.path.insert(0, str(ROOT))

    import torch

    from stages.engine import artifact
    from stages.prompt_learning.fault import checkpoint_io   # keep_previous is looked up there, so patched there

    steps = {"n": 0}
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        if "step" not in cls.__dict__:   # AdamW inherits Adam.step in recent torch: count each step once
            continue
        original = cls.step

        def step(self, *a, _original=original, **kw):
            out = _original(self, *a, **kw)
            steps["n"] += 1
            print(f"fault_runner: optimizer step {steps['n']} done", flush=True)
            if opts.kill_after_step == steps["n"]:
                print("fault_runner: SIGKILL after optimizer step", flush=True)
                _die()
            if opts.usr1_after_step == steps["n"]:
                os.kill(os.getpid(), signal.SIGUSR1)
            if opts.signal_after_step and int(opts.signal_after_step.split(":")[1]) == steps["n"]:
                os.kill(os.getpid(), signal.Signals["SIG" + opts.signal_after_step.split(":")[0]])
            if opts.step_sleep:
                time.sleep(opts.step_sleep)
            return out

        cls.step = step

    saves = {"n": 0}
    real_save = torch.save

    def save(obj, f, *a, **kw):
        if hasattr(f, "write") and f".{checkpoint_io.LAST}." in str(getattr(f, "name", "")):   # the temporary file of last.ckpt
            saves["n"] += 1
            print(f"fault_runner: save {saves['n']} of last.ckpt (step {obj.get('global_step')})", flush=True)
            if opts.kill_mid_save == saves["n"]:
                buf = io.BytesIO()
                real_save(obj, buf, *a, **kw)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                print(f"fault_runner: SIGKILL mid checkpoint save ({len(data) // 2} of {len(data)} bytes written)", flush=True)
                _die()
        return real_save(obj, f, *a, **kw)

    torch.save = save

    keeps = {"n": 0}
    real_keep = checkpoint_io.keep_previous

    def keep_previous(last):
        keeps["n"] += 1
        if opts.kill_in_keep_previous == keeps["n"]:
            half = last.read_bytes()
            last.with_name(f".{checkpoint_io.PREV}.{os.getpid()}.tmp").write_bytes(half[: len(half) // 2])
            print("fault_runner: SIGKILL while handing last.ckpt over to last.prev.ckpt", flush=True)
            _die()
        return real_keep(last)

    checkpoint_io.keep_previous = keep_previous

    if opts.kill_in_artifact:
        real_export = artifact.write_exports

        def export(folder, *a, **kw):
            print("fault_runner: SIGKILL while writing the artifact", flush=True)
            _die()

        artifact.write_exports = export
        del real_export

    sys.argv = [entry, *args]
    runpy.run_path(entry, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
