"""launch.lock: one launch per folder; stale locks (dead pid, reused pid, Slurm jobs gone) taken over; a race of many
launches has exactly one winner; SIGTERM to a local launch reaches the stage's whole process group."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.lock import NAME, LaunchLock, Owner, warn_if_held
from stages.common.errors import UserError
from tests.support.cluster import fake_command
from tests.support.paths import ROOT


def test_second_launch_refused_with_one_line_then_free_after_release(tmp_path):
    first = LaunchLock([str(tmp_path / "a"), str(tmp_path / "b")], "python3 main.py x=1", "local").acquire()
    lock = json.loads((tmp_path / "a" / NAME).read_text())
    assert (lock["pid"], lock["host"], lock["command"]) == (os.getpid(), socket.gethostname(), "python3 main.py x=1")
    with pytest.raises(UserError) as err:
        LaunchLock([str(tmp_path / "c"), str(tmp_path / "b")], "python3 main.py x=2", "local").acquire()
    assert str(err.value).startswith(f"{tmp_path / 'b'} is in use by another launch (pid {os.getpid()} on ")
    assert "python3 main.py x=1); wait for it to finish, kill" in str(err.value)
    assert not (tmp_path / "c").exists()                                   # refused before anything is written
    assert warn_if_held([str(tmp_path / "a")]) and not warn_if_held([str(tmp_path / "c")])
    first.release()
    assert not (tmp_path / "a" / NAME).exists()
    LaunchLock([str(tmp_path / "b")], "again", "local").acquire().release()


def _stale(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    owner = Owner.me("python3 main.py old", "local").__dict__ | fields
    (folder / NAME).write_text(json.dumps(owner))


def test_stale_locks_are_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _stale(tmp_path / "dead", pid=dead.pid)
    _stale(tmp_path / "reused", pid_start="1")                             # this pid, but started at another time
    LaunchLock([str(tmp_path / "dead"), str(tmp_path / "reused")], "new", "local").acquire()
    assert "taking over the stale lock of pid" in capsys.readouterr().err
    assert json.loads((tmp_path / "dead" / NAME).read_text())["command"] == "new"
    _stale(tmp_path / "elsewhere", host="another-host")                    # cannot be checked from here: held
    with pytest.raises(UserError, match=r"stop it on another-host \(or delete .*launch.lock if it is not running\)"):
        LaunchLock([str(tmp_path / "elsewhere")], "new", "local").acquire()


def test_slurm_lock_lasts_while_its_jobs_are_in_squeue(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "squeue", 'for a in "$@"; do case $a in --jobs=*) ids=${a#--jobs=};; esac; done\n'
                                    'for i in ${ids//,/ }; do [[ -e ' + str(tmp_path) + '/running-$i ]] && echo $i; done\nexit 0\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    lock = LaunchLock([str(tmp_path / "s")], "python3 main.py cluster_type=slurm", "slurm").acquire()
    lock.record_jobs(["41", "42"])
    (tmp_path / "running-42").touch()
    with pytest.raises(UserError, match=r"in use by another launch \(Slurm jobs 41,42, .*scancel 41 42"):
        LaunchLock([str(tmp_path / "s")], "next", "local").acquire()
    (tmp_path / "running-42").unlink()                                      # the chain has ended
    LaunchLock([str(tmp_path / "s")], "next", "local").acquire().release()


def _contend(folder: str, i: int, go, out) -> None:
    go.wait()
    try:
        lock = LaunchLock([folder], f"contender {i}", "local").acquire()
        out.put(i)
        time.sleep(0.5)                                                     # hold it while the others try
        lock.release()
    except UserError:
        out.put(-1)


def test_many_simultaneous_launches_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path / "f"), i, go, out)) for i in range(8)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(30)
    results = [out.get(timeout=5) for _ in procs]
    assert len([r for r in results if r >= 0]) == 1, results


STAGE = r'''
import os, signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], "w").write("worker got it"), sys.exit(0)))
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
""", sys.argv[1] + "/worker"])
while not os.path.exists(sys.argv[1] + "/worker.ready"):
    time.sleep(0.05)
def stop(*a):
    time.sleep(0.5)                                      # a checkpoint takes a moment
    print("SIGTERM: checkpoint saved at step 2 to /ck/last.ckpt; rerun the same command to resume", flush=True)
    worker.wait()
    sys.exit(3)
signal.signal(signal.SIGTERM, stop)
print("training", flush=True)
time.sleep(60)
'''


def test_sigterm_to_a_local_launch_reaches_the_stage_group_and_ends_with_one_line(tmp_path):
    """main.py's part without torch: the executor in a process of its own, a stage that has a worker child."""
    entry = tmp_path / "stage.py"
    entry.write_text(STAGE)
    code = ("import sys; from cluster.base import Stopped; from cluster.local import LocalExecutor; "
            "from cluster.jobspec import JobSpec; from stages.common import io\n"
            f"job = JobSpec(stage='prompt_learning', name='pl', results_dir={str(tmp_path)!r}, launcher_scripts_path={str(ROOT)!r}, "
            f"python={sys.executable!r}, entry={str(entry)!r}, config_path={str(tmp_path)!r})\n"
            "ex = LocalExecutor(); io.write_text(job.script_path('local'), ex.render(job).replace(' --config ' + job.config_path, ' ' + job.config_path))\n"
            "try:\n    ex.launch([job])\nexcept Stopped as s:\n    print(s.line(), file=sys.stderr); sys.exit(128 + s.signum)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "log-pl.out").is_file() or "training" not in (tmp_path / "log-pl.out").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip() == ("stopped by SIGTERM: prompt_learning saved its checkpoint /ck/last.ckpt; "
                           "rerun the same command to resume")
    assert (tmp_path / "worker").read_text() == "worker got it"            # the whole group got the signal
