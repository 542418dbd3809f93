"""Golden Slurm and BCP scripts for every stage x model family, rendered by ``python3 main.py ... dry_run=true``.

Paths are fixed (launcher_scripts_path=/opt/promptlaunch, base_results_dir=/mount/results,
data_dir=/mount/data); results are written under a temporary folder that is then renamed to
/mount/results in the text. Regenerate with ``UPDATE_GOLDEN=1 python3 -m pytest tests/cluster/test_slurm_bcp_golden.py``.
Adding a model family is one line in FAMILIES.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.launcher import ROOT, run_main, undigest

GOLDEN = ROOT / "tests" / "golden"
FAMILIES = {  # family -> the config choices that select it (skipped while a config file is missing)
    "gpt": ["prompt_learning=gpt/squad", "evaluation=gpt/squad"],
    "t5": ["prompt_learning=t5/squad", "evaluation=t5/squad"],
    "mt5": ["prompt_learning=mt5/squad", "evaluation=mt5/squad"],
}
STAGES = ("data_preparation", "prompt_learning", "evaluation")
EXECUTORS = ("slurm", "bcp")  # cluster_type = golden folder = script suffix


def dry_run(tmp_path: Path, cluster_type: str, *overrides: str) -> dict[str, str]:
    """Scripts written by a dry run, by stage, with the temporary prefix replaced by /mount/results."""
    results = tmp_path / "mount" / "results"
    proc = run_main(["dry_run=true", f"cluster_type={cluster_type}", "launcher_scripts_path=/opt/promptlaunch",
                     f"base_results_dir={results}", "data_dir=/mount/data", *overrides])
    assert proc.returncode == 0, proc.stderr
    assert f"dry run ({cluster_type})" in proc.stdout
    scripts = {}
    for path in results.rglob(f"*_{cluster_type}.sh"):
        text = undigest(path.read_text().replace(str(results), "/mount/results"))
        stage = text.splitlines()[1].split("'")[1]  # "# promptlaunch stage '<stage>', ..."
        scripts[stage] = text
    return scripts


@pytest.mark.parametrize("cluster_type", EXECUTORS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scripts_match_golden(tmp_path, family, cluster_type):
    missing = [c for c in FAMILIES[family] if not (ROOT / "conf" / (c.replace("=", "/") + ".yaml")).exists()]
    if missing:
        pytest.skip(f"no config for {missing}")
    scripts = dry_run(tmp_path, cluster_type, f"stages=[{','.join(STAGES)}]", *FAMILIES[family])
    assert sorted(scripts) == sorted(STAGES)
    for stage, text in scripts.items():
        path = GOLDEN / cluster_type / f"{stage}_{family}.sh"
        if os.environ.get("UPDATE_GOLDEN") == "1" or not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert text == path.read_text(), f"{path} differs from the rendered script; rerun with UPDATE_GOLDEN=1 if intended"


SEED = ["prompt_learning=gpt/squad", "stages=prompt_learning", "prompt_learning.run.model_train_name=gpt3_5b"]


def test_seed_command_line_bcp(tmp_path):
    (script,) = dry_run(tmp_path, "bcp", *SEED, "launcher_scripts_path=/opt/launcher").values()
    assert "cd /opt/launcher" in script
    assert "bcprun --nnodes 1 --npernode 8 -no_redirect --workdir /opt/launcher \\" in script
    assert ("--cmd 'python3 -u /opt/launcher/stages/prompt_learning/run.py --config "
            "/mount/results/gpt3_5b/prompt_learning_squad/squad_gpt3_5b_hydra-<digest>.yaml'") in script
    assert "2>&1 | tee -a /mount/results/gpt3_5b/prompt_learning_squad/log-squad_gpt3_5b.out" in script


def test_seed_command_line_slurm(tmp_path):
    (script,) = dry_run(tmp_path, "slurm", *SEED, "launcher_scripts_path=/opt/launcher").values()
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=1",
                 "#SBATCH --job-name=promptlaunch-squad_gpt3_5b", "#SBATCH --time=04:00:00",
                 "#SBATCH --output=/mount/results/gpt3_5b/prompt_learning_squad/log-squad_gpt3_5b_%j.out"):
        assert line in script.splitlines()
    assert ("srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=8 python3 -u /opt/launcher/stages/prompt_learning/run.py "
            "--config /mount/results/gpt3_5b/prompt_learning_squad/squad_gpt3_5b_hydra-<digest>.yaml") in script
