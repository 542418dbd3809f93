"""NeMo's spellings (``cluster_type=interactive|bcm``, ``cluster=bcm``, ``prompt_learning=gpt3/...``,
``evaluation=prompt_{gpt3,t5,mt5}/...``) keep working through the one table in ``launcher/aliases.py``, and a
user's own config folder (``--config-dir``) builds on the shipped configs (``examples/my_conf``)."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launcher import aliases
from launcher.app import run
from tests.support.launcher import ROOT, compose_cfg, run_main, undigest


@pytest.mark.parametrize("given,expected", [
    ("cluster_type=interactive", "cluster_type=local"),
    ("cluster_type=bcm", "cluster_type=slurm"),
    ("cluster_type=bcp", "cluster_type=bcp"),
    ("cluster=bcm", "cluster=slurm"),
    ("prompt_learning=gpt3/squad_cpu", "prompt_learning=gpt/squad_cpu"),
    ("prompt_learning=gpt3/squad,t5/squad", "prompt_learning=gpt/squad,t5/squad"),
    ("+prompt_learning=gpt3/squad", "+prompt_learning=gpt/squad"),
    ("evaluation=prompt_gpt3/squad", "evaluation=gpt/squad"),
    ("evaluation=prompt_t5/squad_tiny", "evaluation=t5/squad_tiny"),
    ("evaluation=prompt_mt5/squad", "evaluation=mt5/squad"),
    ("prompt_learning.run.model_train_name=gpt3_5b", "prompt_learning.run.model_train_name=gpt3_5b"),
    ("prompt_learning.run.task_name=gpt3", "prompt_learning.run.task_name=gpt3"),
    ("--config-dir", "--config-dir"),
])
def test_override_rewrites_only_the_aliases(given, expected):
    assert aliases.override(given) == expected


def _dry_run(tmp_path: Path, *args: str, flags: tuple[str, ...] = ()) -> dict[str, str]:
    """Files written by a dry run (path under the results folder -> text with that folder as RESULTS), but not
    launcher_cmd.log, which records the command line as typed."""
    results = tmp_path / "results"
    tmp_path.mkdir(parents=True, exist_ok=True)  # the cwd: a -m sweep writes Hydra's multirun/ folder there
    proc = run_main([*flags, "dry_run=true", f"base_results_dir={results}", "data_dir=/mount/data",
                     "launcher_scripts_path=/opt/promptlaunch", *args], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return {undigest(str(p.relative_to(results))): undigest(p.read_text().replace(str(results), "RESULTS"))
            for p in sorted(results.rglob("*")) if p.is_file() and p.name != "launcher_cmd.log"}


def test_nemo_command_line_writes_what_the_new_words_write(tmp_path):
    old = _dry_run(tmp_path / "old", "cluster_type=bcm", "cluster=bcm", "prompt_learning=gpt3/squad",
                   "evaluation=prompt_gpt3/squad", "prompt_learning.run.model_train_name=gpt3_5b")
    new = _dry_run(tmp_path / "new", "cluster_type=slurm", "cluster=slurm", "prompt_learning=gpt/squad",
                   "evaluation=gpt/squad", "prompt_learning.run.model_train_name=gpt3_5b")
    assert old == new and any(p.endswith("squad_gpt3_5b_slurm.sh") for p in new)
    local = _dry_run(tmp_path / "local", "cluster_type=interactive")
    assert sorted(p.rsplit("_", 1)[-1] for p in local if p.endswith(".sh")) == ["local.sh"] * 3


def test_sweep_over_alias_spellings(tmp_path):
    files = _dry_run(tmp_path, "stages=[prompt_learning]", "cluster_type=bcm", "prompt_learning=gpt3/squad,t5/squad",
                     flags=("-m",))
    scripts = sorted(p for p in files if p.endswith(".sh"))
    sweep = "sweeps/prompt_learning=gpt-squad~t5-squad-"   # '/' made '-': a digest keeps the name apart
    assert [s.split("/", 3)[2:] for s in scripts] == [
        ["prompt_learning=gpt-squad", "gpt3_5b/prompt_learning_squad/squad_gpt3_5b_slurm.sh"],
        ["prompt_learning=t5-squad", "t5_220m/prompt_learning_squad/squad_t5_220m_slurm.sh"]]
    assert all(s.startswith(sweep) for s in scripts)


def test_cluster_type_alias_in_a_config_file(tmp_path, capsys):
    """A config composed without main.py (a user's file saying ``cluster_type: bcm``) is mapped by the launcher."""
    cfg = compose_cfg(["cluster_type=bcm", "dry_run=true", "stages=[data_preparation]",
                       f"base_results_dir={tmp_path}/r", f"data_dir={tmp_path}/d"])
    assert run(cfg, []) == 0
    assert "dry run (slurm)" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "r").rglob("*.sh")] == ["download_squad_slurm.sh"]


# ---- a user's own tasks through --config-dir (the README's two-task example) ----------------------------------
MY_CONF = ROOT / "examples" / "my_conf"


def _composed(tmp_path: Path, task: str) -> dict:
    results = tmp_path / "results"
    proc = run_main(["--config-dir", str(MY_CONF), "stages=[prompt_learning]", f"prompt_learning={task}",
                     "dry_run=true", f"base_results_dir={results}", f"data_dir={tmp_path}/data"])
    assert proc.returncode == 0, proc.stderr
    (path,) = results.rglob(f"{task}_*_hydra-*.yaml")
    return OmegaConf.to_container(OmegaConf.load(path))


def test_user_tasks_build_on_the_shipped_configs(tmp_path):
    first = _composed(tmp_path, "winogrande")
    assert first["run"]["name"] == "winogrande_smollm2_135m"
    assert first["run"]["results_dir"] == f"{tmp_path}/results/smollm2_135m/prompt_learning_winogrande"
    assert first["model"]["new_tasks"] == ["winogrande"] and first["model"]["existing_tasks"] == []
    assert first["model"]["data"]["train_ds"] == [f"{tmp_path}/data/winogrande/train.jsonl"]
    # from /prompt_learning/gpt/squad_cpu and, below it, /prompt_learning/gpt/squad
    assert first["model"]["language_model_path"] == "embedded:smollm2-135m-instruct"
    assert first["trainer"]["max_steps"] == 300 and first["trainer"]["accelerator"] == "cpu"
    assert first["exp_manager"]["resume_if_exists"] is True

    second = _composed(tmp_path, "rte")
    artifact = f"{tmp_path}/results/smollm2_135m/prompt_learning_winogrande/results/prompt_artifact"
    assert second["model"]["restore_path"] == artifact == first["model"]["artifact_path"]
    assert second["model"]["existing_tasks"] == ["winogrande"] and second["model"]["new_tasks"] == ["rte"]
    assert [t["taskname"] for t in second["model"]["task_templates"]] == ["winogrande", "rte"]
    assert second["model"]["task_templates"][0] == first["model"]["task_templates"][0]
    assert second["run"]["name"] == "rte_smollm2_135m"
    assert second["model"]["data"]["share_prefix"] is False and second["trainer"]["max_steps"] == 300


def test_missing_user_config_is_one_line(tmp_path):
    proc = run_main(["--config-dir", str(MY_CONF), "prompt_learning=nope", f"base_results_dir={tmp_path}/r"])
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: command line:") and "prompt_learning/nope" in line
