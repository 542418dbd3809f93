"""Sweeps without training: folder names from the swept keys, the per-job folders and Slurm job names of a dry-run
sweep, the summary, and the config snapshot's digest name."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from launcher.plan import config_name
from launcher.sweep import Sweep, summarize
from tests.support.launcher import run_main


@pytest.mark.parametrize("argv,name,folders", [
    (["-m", "prompt_learning.model.optim.lr=0.01,0.03"], "lr=0.01~0.03", ["lr=0.01", "lr=0.03"]),
    (["-m", "x=1", "a.optim.lr=1,2", "b.optim.lr=3"], "lr=1~2", ["lr=1", "lr=2"]),            # only swept keys count
    (["-m", "a.optim.lr=1,2", "b.sched.lr=3,4"], "optim.lr=1~2+sched.lr=3~4",                 # shortest unique suffix
     ["optim.lr=1+sched.lr=3", "optim.lr=1+sched.lr=4", "optim.lr=2+sched.lr=3", "optim.lr=2+sched.lr=4"]),
    (["-m", "+p.seed=1,2"], "seed=1~2", ["seed=1", "seed=2"]),
])
def test_names_come_from_the_swept_keys(argv, name, folders):
    sweep = Sweep.from_argv(argv)
    assert (sweep.name, list(sweep.folders)) == (name, folders)
    assert Sweep.from_argv(argv) == sweep                                          # stable


def test_unsafe_values_are_made_safe_without_collisions():
    sweep = Sweep.from_argv(["-m", "k='a/b','a b',a-b,a-b-2"])
    assert list(sweep.folders) == ["k=a-b", "k=a-b-2", "k=a-b-3", "k=a-b-2-2"]
    assert sweep.name.startswith("k=a-b~a-b~a-b~a-b-2-") and len(sweep.name) == len("k=a-b~a-b~a-b~a-b-2-") + 8
    long = Sweep.from_argv(["-m", "key=" + ",".join(str(10 ** 12 + i) for i in range(20))])
    assert len(long.name) <= 80 and len(set(long.folders)) == 20
    assert sweep.job_of(["x=1", "k='a b'"]) == 1


def test_config_snapshot_is_named_by_its_digest():
    text = "a: 1\n"
    assert config_name("squad", text) == f"squad_hydra-{hashlib.sha256(text.encode()).hexdigest()[:10]}.yaml"
    assert config_name("squad", "a: 2\n") != config_name("squad", text)


def test_dry_run_sweep_on_slurm_one_folder_and_job_name_per_job(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    results = tmp_path / "results"
    proc = run_main(["-m", "stages=[data_preparation,prompt_learning,evaluation]", "cluster_type=slurm", "dry_run=true",
                     f"base_results_dir={results}", f"data_dir={tmp_path}/data", "prompt_learning.model.optim.lr=0.01,0.03"],
                    cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert list(cwd.iterdir()) == []                                       # no multirun/ in the current folder
    sweep = results / "sweeps" / "lr=0.01~0.03"
    names = {}
    for job in ("lr=0.01", "lr=0.03"):
        record = json.loads((sweep / job / "sweep.json").read_text())
        assert record["sweep"]["swept"] == {"prompt_learning.model.optim.lr": ["0.01", "0.03"]}
        assert "prompt_learning.model.optim.lr=" + job[3:] in record["job"]["overrides"]
        assert set(record["stages"]) == {"data_preparation", "prompt_learning", "evaluation"}
        scripts = sorted((sweep / job).rglob("*_slurm.sh"))
        assert len(scripts) == 3                                            # the whole pipeline moved
        names[job] = sorted(line for s in scripts for line in s.read_text().splitlines() if "--job-name" in line)
        ev = next((sweep / job).rglob("eval_*_hydra-*.yaml")).read_text()
        assert f"{sweep / job}/smollm2_135m/prompt_learning_squad/results/prompt_artifact" in ev
    assert "#SBATCH --job-name=promptlaunch-lr=0.01-squad_smollm2_135m" in names["lr=0.01"]
    assert not set(names["lr=0.01"]) & set(names["lr=0.03"])
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["state"] for r in summary["jobs"]] == ["dry run", "dry run"]


def test_a_results_dir_outside_the_job_folder_is_refused(tmp_path):
    proc = run_main(["-m", "stages=[data_preparation]", "dry_run=true", f"base_results_dir={tmp_path}/r",
                     f"data_dir={tmp_path}/d", f"data_preparation.run.results_dir={tmp_path}/fixed", "data_preparation.force=true,false"],
                    cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[0].startswith(
        f"error: data_preparation.run.results_dir: '{tmp_path}/fixed' is outside this sweep job's folder")
    assert not (tmp_path / "fixed").exists()


def test_summary_reads_each_jobs_results_not_the_set_aside_ones(tmp_path):
    for n, (lr, loss) in enumerate([(0.01, 2.0), (0.03, 1.5)]):
        job = tmp_path / f"lr={lr}"
        log = job / "m" / "prompt_learning_squad" / "results"
        log.mkdir(parents=True)
        (log / "prompt_learning_summary.json").write_text(json.dumps({"final_val_loss": loss, "lr": lr, "steps": 4}))
        old = job / "m" / "prompt_learning_squad" / "previous" / "t" / "results"
        old.mkdir(parents=True)
        (old / "prompt_learning_summary.json").write_text(json.dumps({"final_val_loss": 9.0}))
        (job / "m" / "evaluation_squad").mkdir(parents=True)
        (job / "m" / "evaluation_squad" / "metrics.json").write_text(json.dumps({"exact_match": 10.0 * n, "f1": 20.0}))
        (job / "sweep.json").write_text(json.dumps({
            "sweep": {"swept": {"model.lr": ["0.01", "0.03"]}}, "cluster_type": "local", "exit_code": 0,
            "job": {"number": n, "folder": job.name, "values": {"model.lr": str(lr)}}}))
    md = summarize(tmp_path).read_text()
    assert "| 0 | 0.01 | completed | 2 | 0 | 20 | lr=0.01 |" in md and "| 1 | 0.03 | completed | 1.5 | 10 | 20 | lr=0.03 |" in md
    assert Path(tmp_path / "sweep_summary.png").is_file()
