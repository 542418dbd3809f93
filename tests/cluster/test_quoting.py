"""No rendered script (local, Slurm, BCP) executes text taken from the config, and secrets stay secret.

Each script is rendered from hostile values (spaces, quotes, $(...), backticks, ';', '&', globs,
newlines, backslashes) in every user-controlled place, then run with bash in a throwaway folder with
stand-ins for srun/scontrol/bcprun. The stage program reports what it received: every value must
arrive byte for byte, and no marker file may appear.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bcp import BCPExecutor
from cluster.local import LocalExecutor
from cluster.slurm import SlurmExecutor
from stages.common.errors import UserError
from tests.support.cluster import FAKE_BIN, fake_command, tiny_job, write_scripts
from tests.support.launcher import run_main

SECRET = "sk-test-0123456789abcdef"
FAKE_SRUN = 'while [[ $# -gt 0 && $1 == --* ]]; do shift; done\nexec "$@"\n'  # drop srun's options, run the task

PROGRAM = """\
import json, os, sys
key = open(os.environ["KEY_FILE"]).read().strip()
json.dump({"argv": sys.argv, "cwd": os.getcwd(), "hostile": os.environ["HOSTILE"],
           "key_ok": os.environ.get("WANDB_API_KEY") == key}, open(os.environ["RESULT"], "w"))
print("program ran")
"""


def hostile(marker_dir: Path, n: int, multiline: bool) -> str:
    """A name that runs ``touch`` (creating PWNED<n>...) if any shell ever evaluates it."""
    m = marker_dir
    text = f"a b \"dq\" 'sq' $(touch {m}/PWNED{n}a) `touch {m}/PWNED{n}b` ; touch {m}/PWNED{n}c & | > < * ? ~ # %j {{}}"
    return text + (f" \\ \n touch {m}/PWNED{n}d \n" if multiline else "")


@pytest.mark.parametrize("executor_name,container", [("local", False), ("slurm", False), ("slurm", True), ("bcp", False)])
def test_hostile_values_stay_literal(tmp_path, executor_name, container):
    markers = tmp_path / "markers"
    markers.mkdir()
    sbatch_safe = executor_name != "slurm"  # Slurm refuses newlines and backslashes in results_dir (tested below)
    root = tmp_path / hostile(markers, 1, True) / "launcher"
    root.mkdir(parents=True)
    python = tmp_path / hostile(markers, 2, True) / "py"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    key_file = tmp_path / hostile(markers, 3, True) / "key"
    key_file.parent.mkdir(parents=True)
    key_file.write_text(SECRET + "\n")
    env_value = hostile(markers, 4, True)
    job = tiny_job(tmp_path, "hostile", PROGRAM, results_dir=tmp_path / hostile(markers, 5, sbatch_safe) / "res",
                   entry=tmp_path / hostile(markers, 6, True) / "entry.py", launcher_scripts_path=str(root),
                   python=str(python), env=(("HOSTILE", env_value),), secret_files=(("WANDB_API_KEY", str(key_file)),),
                   container="img" if container else None,
                   container_mounts=(f"{hostile(markers, 7, False)}:/x",) if container else ())
    executor = {"local": LocalExecutor(), "slurm": SlurmExecutor({"job_name_prefix": hostile(markers, 8, False)}),
                "bcp": BCPExecutor()}[executor_name]
    (script,) = write_scripts(executor, [job])

    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "srun", FAKE_SRUN)
    fake_command(bin_dir, "scontrol", "echo localhost\n")
    result = tmp_path / "result.json"
    env = {"PATH": f"{bin_dir}:{FAKE_BIN}:{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "LANG": "C.UTF-8", "RESULT": str(result), "KEY_FILE": str(key_file),
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "42"}
    proc = subprocess.run(["bash", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert sorted(p.name for p in markers.iterdir()) == []
    assert proc.returncode == 0, proc.stderr
    got = json.loads(result.read_text())
    assert got["argv"] == [job.entry, "--config", job.config_path]
    assert got["hostile"] == env_value
    assert got["key_ok"] is True
    if not container:  # with a container, pyxis sets the working folder inside it (our srun stand-in does not)
        assert got["cwd"] == str(root)
    text = Path(script).read_text() + proc.stdout + proc.stderr
    if Path(job.log_path).exists():
        text += Path(job.log_path).read_text()
    assert SECRET not in text and "program ran" in text


@pytest.mark.parametrize("field", ["results_dir", "signal"])
def test_slurm_refuses_a_newline_that_would_end_an_sbatch_comment(tmp_path, field):
    job = tiny_job(tmp_path, "n", "")
    bad = {"results_dir": {"results_dir": "/tmp/r\ntouch /tmp/PWNED"}, "signal": {"signal": "USR1\nid"}}
    spec = type(job)(**{**job.__dict__, **bad[field]})
    with pytest.raises(UserError, match="newline or control character"):
        SlurmExecutor().check(spec)
    with pytest.raises(ValueError):
        SlurmExecutor().render(spec)


@pytest.mark.parametrize("cluster_type", ["local", "slurm", "bcp"])
def test_secret_never_written_or_printed(tmp_path, cluster_type):
    key = tmp_path / "wandb.key"
    key.write_text(SECRET)
    results = tmp_path / "results"
    proc = run_main(["dry_run=true", f"cluster_type={cluster_type}", f"base_results_dir={results}",
                     "prompt_learning=gpt/squad", "evaluation=gpt/squad",
                     f"data_dir={tmp_path}/data", f"wandb_api_key_file={key}"])
    assert proc.returncode == 0, proc.stderr
    files = [p for p in results.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".sh", ".yaml", ".log"}
    scripts = [p for p in files if p.suffix == ".sh"]
    assert len(scripts) == 3
    for p in scripts:
        assert f'export WANDB_API_KEY="$(cat {key})"' in p.read_text()
    for p in files:
        assert SECRET not in p.read_text(), p
    assert SECRET not in proc.stdout + proc.stderr
