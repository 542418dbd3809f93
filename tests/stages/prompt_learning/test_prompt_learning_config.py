"""stages/prompt_learning/config.py: the stage's task rules, checked once, worded once (the full key path), and
said in the same line by the launcher before submission and by the stage inside the job."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from stages.common.errors import UserError
from stages.prompt_learning.config import check_tasks
from tests.support.launcher import run_main
from tests.support.templates import SQUAD_T

BASE = {"virtual_prompt_style": "prompt-tuning", "task_templates": [SQUAD_T], "new_tasks": ["squad"], "existing_tasks": [],
        "prompt_tuning": {"new_prompt_init_methods": ["text"]}}
RULES = [  # (change to BASE, the one line)
    ({"virtual_prompt_style": "prefix"}, "prompt_learning.model.virtual_prompt_style: 'prefix' is not one of prompt-tuning, p-tuning"),
    ({"virtual_prompt_style": "p-tuning", "p_tuning": {"encoder_type": "gru"}},
     "prompt_learning.model.p_tuning.encoder_type: 'gru' is not one of mlp, lstm"),
    ({"new_tasks": []}, "prompt_learning.model.new_tasks: empty; name the task(s) to tune, e.g. new_tasks=[squad]"),
    ({"new_tasks": ["rte"]}, "prompt_learning.model.new_tasks: 'rte' has no entry in model.task_templates (have: ['squad'])"),
    ({"existing_tasks": ["squad"], "restore_path": "/a"},
     "prompt_learning.model.new_tasks: ['squad'] also in existing_tasks; a task is either new or existing"),
    ({"new_tasks": [""]}, "prompt_learning.model.new_tasks: expected a list of task names such as [squad], got"),
    ({"prompt_tuning": {"new_prompt_init_methods": ["text", "text"]}},
     "prompt_learning.model.prompt_tuning.new_prompt_init_methods: 2 entries for 1 new tasks; give one per task"),
    ({"prompt_tuning": {"new_prompt_init_methods": ["zeros"]}},
     "prompt_learning.model.prompt_tuning.new_prompt_init_methods: 'zeros' is not one of random, text, vocab, file"),
]


@pytest.mark.parametrize("change,line", RULES)
def test_each_rule_is_one_line_naming_the_full_key(change, line):
    with pytest.raises(UserError) as exc:
        check_tasks(OmegaConf.create({**BASE, **change}))
    assert str(exc.value).startswith(line)


def test_a_valid_config_gives_the_tasks_and_a_bare_task_name_becomes_a_list():
    m = OmegaConf.create({**BASE, "new_tasks": "squad"})
    tasks = check_tasks(m)
    assert (tasks.style, list(tasks.templates), tasks.new, tasks.existing) == ("prompt-tuning", ["squad"], ["squad"], [])
    assert list(m.new_tasks) == ["squad"]


def test_existing_tasks_need_a_restore_path():
    m = OmegaConf.create({**BASE, "task_templates": [SQUAD_T, dict(SQUAD_T, taskname="rte")], "existing_tasks": ["rte"]})
    with pytest.raises(UserError, match=r"^prompt_learning\.model\.restore_path: required with existing_tasks"):
        check_tasks(m)


def test_the_launcher_and_the_stage_say_the_same_line(tmp_path):
    """Before submission (main.py) and inside the job (the stage's train on its handed config): one wording."""
    from stages.prompt_learning.train import train
    from tests.support.training import make_cfg

    line = "prompt_learning.model.virtual_prompt_style: 'prefix' is not one of prompt-tuning, p-tuning"
    proc = run_main(["stages=[prompt_learning]", "dry_run=true", f"base_results_dir={tmp_path}/r", f"data_dir={tmp_path}/d",
                     "prompt_learning.model.virtual_prompt_style=prefix"])
    assert proc.returncode == 2 and f"error: {line}" in proc.stderr, proc.stderr[-800:]
    cfg = make_cfg(tmp_path / "stage", "unused-model-path", style="prefix")
    with pytest.raises(UserError) as exc:
        train(cfg)
    assert str(exc.value) == line


# ---- the multi-node plan: nodes x devices against TP x PP x DP, run.nodes against trainer.num_nodes ----------------

def _nodes_cfg(tmp_path, **trainer):
    from tests.support.training import make_cfg

    cfg = make_cfg(tmp_path, "unused-model-path")
    for key, value in trainer.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.mark.parametrize("changes,lines", [
    ({"trainer.num_nodes": 2, "trainer.devices": 2, "model.tensor_model_parallel_size": 4, "run.nodes": 3},
     ["prompt_learning.run.nodes: 3 but prompt_learning.trainer.num_nodes=2, which is what the job asks for (2 x "
      "trainer.devices=2 processes); set prompt_learning.trainer.num_nodes=3, or prompt_learning.run.nodes=2",
      "prompt_learning.model.tensor_model_parallel_size: 4 does not divide prompt_learning.trainer.devices=2 (processes "
      "per node), so with 2 nodes a tensor-parallel group would span two nodes and all-reduce every layer across the "
      "network; set prompt_learning.model.tensor_model_parallel_size to a divisor of 2 or trainer.devices to a "
      "multiple of 4"]),
    ({"trainer.num_nodes": 2, "trainer.devices": 3, "model.tensor_model_parallel_size": 4, "run.nodes": 1},
     ["prompt_learning.run.nodes: 1 but prompt_learning.trainer.num_nodes=2, which is what the job asks for (2 x "
      "trainer.devices=3 processes); set prompt_learning.trainer.num_nodes=1, or prompt_learning.run.nodes=2",
      "prompt_learning.model.tensor_model_parallel_size x prompt_learning.model.pipeline_model_parallel_size = 4x1 does "
      "not divide the world size 6 (trainer.devices x trainer.num_nodes); change the devices or the parallel sizes"]),
])
def test_multinode_plan_mismatches_are_one_line_each(tmp_path, changes, lines):
    from stages.prompt_learning.config import check_config

    with pytest.raises(UserError) as exc:
        check_config(_nodes_cfg(tmp_path, **changes))
    assert exc.value.lines == lines


def test_a_consistent_multinode_plan_passes(tmp_path):
    from stages.prompt_learning.config import check_config

    checked = check_config(_nodes_cfg(tmp_path, **{"trainer.num_nodes": 2, "trainer.devices": 2, "run.nodes": 2,
                                                   "model.tensor_model_parallel_size": 2, "model.micro_batch_size": 2}))
    assert (checked.layout.tp, checked.layout.dp, checked.stage.resources.nodes) == (2, 2, 2)


def test_main_py_prints_every_plan_mismatch_and_writes_nothing(tmp_path):
    common = ["stages=[prompt_learning]", "dry_run=true", "cluster_type=slurm", f"base_results_dir={tmp_path}/r",
              f"data_dir={tmp_path}/d", f"prompt_learning.model.language_model_path={tmp_path}/no-model"]
    training = run_main([*common, "prompt_learning.trainer.num_nodes=2", "prompt_learning.trainer.devices=2",
                         "prompt_learning.model.tensor_model_parallel_size=4", "+prompt_learning.run.nodes=3"])
    slurm = run_main([*common, "prompt_learning.trainer.num_nodes=2", "prompt_learning.trainer.devices=4",
                      "prompt_learning.trainer.accelerator=gpu", "prompt_learning.model.global_batch_size=8",
                      "prompt_learning.model.micro_batch_size=1", "cluster.gpus_per_node=2",
                      "cluster.srun_args=['--ntasks-per-node=2']"])
    for proc, starts in ((training, ["prompt_learning.run.nodes: 3 but", "prompt_learning.model.tensor_model_parallel_size: 4 does not divide"]),
                         (slurm, ["cluster.srun_args: --ntasks-per-node=2 but", "cluster.gpus_per_node: 2 GPUs per node"])):
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and [e.split(": ", 1)[1][:len(s)] for e, s in zip(errors, starts)] == starts, proc.stderr
        assert len(errors) == 2, proc.stderr
    assert not (tmp_path / "r").exists()
