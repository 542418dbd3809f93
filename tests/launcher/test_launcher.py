"""Planning, validation and local rendering: fast tests, no torch, no stage programs run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cluster.local import LocalExecutor
from stages.common.errors import UserError
from cluster.jobspec import JobSpec
from launcher.plan import plan
from launcher.schema import resolve_all
from launcher.validate import normalize_stages, validate
from stages.common.checks import StageCheck, check_trainer
from tests.support.launcher import BAD_INPUTS, ROOT, compose_cfg, run_main, undigest

GOLDEN = ROOT / "tests" / "golden" / "local"


def _cfg(tmp_path: Path, *extra: str):
    cfg = compose_cfg([f"base_results_dir={tmp_path}/results", f"data_dir={tmp_path}/data",
                       "launcher_scripts_path=/opt/promptlaunch", *extra])
    resolve_all(cfg)
    return cfg


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("prompt_learning", ["prompt_learning"]),
        ("[data_preparation,evaluation]", ["data_preparation", "evaluation"]),
        (["evaluation"], ["evaluation"]),
    ],
)
def test_stages_accept_bare_string_and_list(raw, expected):
    assert normalize_stages(raw) == expected


@pytest.mark.parametrize("raw,msg", [("training", "unknown stage 'training'"), ([], "empty"),
                                     (["evaluation", "evaluation"], "listed twice"), (3, "expected a list")])
def test_stages_rejects(raw, msg):
    with pytest.raises(UserError, match=msg):
        normalize_stages(raw)


def test_default_pipeline_plans_three_jobs(tmp_path):
    cfg = _cfg(tmp_path)
    checked = validate(cfg)
    assert checked.stages == ["data_preparation", "prompt_learning", "evaluation"]
    assert checked.warnings == []  # data and artifact come from earlier stages of the same pipeline
    jobs = plan(cfg, checked.checks)
    specs = [j.spec for j in jobs]
    assert [s.stage for s in specs] == checked.stages
    pl = specs[1]
    assert pl.results_dir == f"{tmp_path}/results/smollm2_135m/prompt_learning_squad"
    assert undigest(pl.config_path) == f"{pl.results_dir}/squad_smollm2_135m_hydra-<digest>.yaml"
    assert pl.entry == "/opt/promptlaunch/stages/prompt_learning/run.py"
    assert (pl.nodes, pl.tasks_per_node, pl.gpus_per_node) == (1, 1, 0)
    assert dict(pl.env) == {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}  # null values skipped
    # evaluation follows the prompt_learning stage of the same pipeline
    ev = specs[2]
    assert ev.results_dir == f"{tmp_path}/results/smollm2_135m/evaluation_squad"
    assert f"{pl.results_dir}/results/prompt_artifact" in jobs[2].config_yaml


def test_nemo_recipe_values(tmp_path):
    cfg = _cfg(tmp_path, "prompt_learning=gpt/squad", "prompt_learning.run.model_train_name=gpt3_5b")
    run = cfg.prompt_learning.run
    assert run.name == "squad_gpt3_5b"
    assert run.results_dir == f"{tmp_path}/results/gpt3_5b/prompt_learning_squad"
    assert cfg.prompt_learning.trainer.devices == 8
    resources = check_trainer(cfg.prompt_learning, "prompt_learning").resources()   # the recipe's .nemo base model is not on this machine
    spec = plan(cfg, {"prompt_learning": StageCheck(resources=resources)})[0].spec
    assert (spec.nodes, spec.tasks_per_node, spec.gpus_per_node) == (1, 8, 8)


def test_missing_inputs_warn_in_dry_run_and_fail_otherwise(tmp_path):
    cfg = _cfg(tmp_path, "stages=[prompt_learning]", "dry_run=true")
    checked = validate(cfg)
    assert any("prompt_learning.model.data.train_ds" in w for w in checked.warnings)
    cfg = _cfg(tmp_path, "stages=[prompt_learning]")
    with pytest.raises(UserError, match=r"prompt_learning.model.data.train_ds: .* does not exist; run the data_preparation"):
        validate(cfg)


@pytest.mark.parametrize(
    "overrides,msg",
    [
        (["prompt_learning.model.task_templates.0.virtual_token_splits=[5,5]"], r"sums to 10 but total_virtual_tokens is 20"),
        (["prompt_learning.model.tensor_model_parallel_size=3", "prompt_learning.trainer.devices=2"], r"3x1 does not divide"),
        (["prompt_learning.model.global_batch_size=12"], r"not a multiple of prompt_learning.model.micro_batch_size"),
        (["prompt_learning.trainer.precision=fp8"], r"precision: .fp8. is not one of auto"),
        (["prompt_learning.model.language_model_path=/x/megatron_gpt.nemo"], r"language_model_path: '/x/megatron_gpt.nemo' does not exist"),
        (["prompt_learning.model.new_tasks=[boolq]"], r"'boolq' has no entry in model.task_templates"),
        (["prompt_learning.model.existing_tasks=[squad]"], r"also in existing_tasks"),
        (["prompt_learning.run.time_limit=tomorrow"], r"time_limit: 'tomorrow'"),
        (["prompt_learning.trainer.num_nodes=2", "prompt_learning.model.global_batch_size=16"], None),  # valid config; the local executor rejects it
    ],
)
def test_validation_errors_name_the_key(tmp_path, overrides, msg):
    cfg = _cfg(tmp_path, *overrides)
    if msg is None:
        spec = plan(cfg, validate(cfg).checks)[1].spec
        with pytest.raises(UserError, match="num_nodes=1 or use cluster_type=slurm"):
            LocalExecutor().check(spec)
        return
    with pytest.raises(UserError, match=msg):
        validate(cfg)


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1" or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"rendered script differs from {path}; rerun with UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("stage", ["data_preparation", "prompt_learning", "evaluation"])
def test_local_scripts_match_golden(tmp_path, stage):
    cfg = _cfg(tmp_path, "env_vars.HF_HUB_OFFLINE=1")
    jobs = {j.spec.stage: j.spec for j in plan(cfg, validate(cfg).checks)}
    text = undigest(LocalExecutor().render(jobs[stage]).replace(str(tmp_path), "/TMP"))
    _golden(f"{stage}.sh", text)


def test_multiprocess_stage_uses_torchrun(tmp_path):
    cfg = _cfg(tmp_path, "prompt_learning.trainer.devices=2", "prompt_learning.model.micro_batch_size=4")
    spec = plan(cfg, validate(cfg).checks)[1].spec
    script = LocalExecutor().render(spec)
    assert "python3 -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=2 /opt/promptlaunch/stages/prompt_learning/run.py" in script


def _job(tmp_path: Path, name: str, code: str) -> JobSpec:
    entry = tmp_path / f"{name}.py"
    entry.write_text(code)
    return JobSpec(stage=name, name=name, results_dir=str(tmp_path / name), launcher_scripts_path=str(tmp_path),
                   python=sys.executable, entry=str(entry), config_path=str(tmp_path / f"{name}.yaml"))


def test_local_executor_streams_logs_and_stops_at_first_failure(tmp_path, capsys):
    ex = LocalExecutor()
    jobs = [_job(tmp_path, "one", "print('hello from one')"),
            _job(tmp_path, "two", "import sys; print('boom'); sys.exit(3)"),
            _job(tmp_path, "three", "open('ran_three','w')")]
    for j in jobs:
        Path(j.results_dir).mkdir()
        Path(j.script_path(ex.name)).write_text(ex.render(j))
    rc = ex.launch(jobs)
    assert rc == 3
    assert "hello from one" in Path(jobs[0].log_path).read_text()
    assert "boom" in Path(jobs[1].log_path).read_text()
    assert not Path(jobs[2].log_path).exists() and not (tmp_path / "ran_three").exists()
    err = capsys.readouterr().err
    assert "stage 'two' failed with exit code 3" in err and "Not run: three" in err


def test_dry_run_writes_three_scripts_and_configs_without_torch(tmp_path):
    probe = ("import runpy, sys, atexit\n"
             "atexit.register(lambda: print('TORCH_LOADED=' + str('torch' in sys.modules)))\n"
             f"sys.argv = ['main.py', 'dry_run=true', 'base_results_dir={tmp_path}/r', 'data_dir={tmp_path}/d',"
             " 'stages=[data_preparation,prompt_learning,evaluation]']\n"
             f"runpy.run_path({str(ROOT / 'main.py')!r}, run_name='__main__')\n")
    import subprocess

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TORCH_LOADED=False" in out.stdout
    scripts = sorted(p.name for p in (tmp_path / "r").rglob("*_local.sh"))
    configs = sorted(p.name for p in (tmp_path / "r").rglob("*_hydra-*.yaml"))
    assert len(scripts) == 3 and len(configs) == 3
    assert all((tmp_path / "r").rglob("launcher_cmd.log"))
    assert "dry run (local): 3 stage(s) written, nothing run" in out.stdout
    assert not list((tmp_path / "r").rglob("log-*"))  # nothing ran


@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, args, needle):
    results = tmp_path / "results"
    out = run_main([f"base_results_dir={results}", f"data_dir={tmp_path}/data", *args])
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in out.stderr
    assert not results.exists() or not any(results.rglob("*")), "nothing may be written for a rejected config"
