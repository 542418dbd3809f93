"""The prompt_learning stage on the tiny models, in-process: a complete stage config, training, the tables an artifact
holds, and the incremental-task check both model families share."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from tests.support.records import sent_records, squad_records, write_jsonl
from tests.support.templates import SENT_T, SQUAD_T


def make_cfg(tmp: Path, model_dir: str, *, templates=(SQUAD_T,), new_tasks=("squad",), train=None, val=None, style="prompt-tuning",
             max_steps=4, **model_over) -> OmegaConf:
    """A complete prompt_learning stage config on ``model_dir``: toy SQuAD data, CPU, a few steps; ``model_over``
    sets ``model.<key>``."""
    tmp.mkdir(parents=True, exist_ok=True)
    train = train if train is not None else write_jsonl(tmp / "train.jsonl", squad_records(24))
    val = val if val is not None else write_jsonl(tmp / "val.jsonl", squad_records(8, seed=5))
    cfg = {
        "run": {"name": "test", "results_dir": str(tmp / "results")},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "precision": "32", "max_epochs": -1,
                    "max_steps": max_steps, "log_every_n_steps": 1, "val_check_interval": 2, "limit_val_batches": 1.0,
                    "gradient_clip_val": 1.0, "accumulate_grad_batches": 1, "enable_progress_bar": False},
        "exp_manager": {"explicit_log_dir": str(tmp / "results" / "log"), "resume_if_exists": True,
                        "create_tensorboard_logger": False, "create_csv_logger": True, "create_wandb_logger": False,
                        "checkpoint_callback_params": {"monitor": "val_loss", "mode": "min", "save_top_k": 1}},
        "model": {
            "seed": 7, "language_model_path": model_dir, "virtual_prompt_style": style,
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
            "global_batch_size": 4, "micro_batch_size": 4, "restore_path": None, "existing_tasks": [],
            "new_tasks": list(new_tasks), "task_templates": [dict(t) for t in templates],
            "prompt_tuning": {"new_prompt_init_methods": ["random"], "new_prompt_init_text": [None], "new_prompt_init_file": [None],
                              "init_std": None},
            "p_tuning": {"encoder_type": "mlp", "num_layers": 2, "encoder_hidden": 16, "dropout": 0.0, "init_std": 0.1},
            "data": {"train_ds": [train], "validation_ds": [val], "add_eos": True, "shuffle": True, "num_workers": 0,
                     "max_seq_length": 128, "min_seq_length": 1, "max_train_examples": None, "max_val_examples": None},
            "optim": {"name": "adamw", "lr": 0.05, "weight_decay": 0.0, "betas": [0.9, 0.98],
                      "sched": {"name": "cosine", "warmup_steps": 1, "min_lr": 0.0}},
            "artifact_path": str(tmp / "results" / "artifact"),
        },
    }
    c = OmegaConf.create(cfg)
    for k, v in model_over.items():
        OmegaConf.update(c, f"model.{k}", v, merge=False)
    return c


def train(cfg, **kw):
    from stages.prompt_learning.train import train as _train

    return _train(cfg, **kw)


def tables(artifact: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(artifact) / "prompts.safetensors"))


def train_single_thread(cfg) -> None:
    """The uninterrupted reference, in this process but with the one CPU thread the subprocesses use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)


def check_two_task_incremental(tmp_path, build_cfg, model_dir, squad_template, hidden: int, n_train: int) -> None:
    """Tune squad, then sentiment with existing_tasks=[squad]: squad stays bit-identical, both generate in one batch.

    ``build_cfg`` is the family's config builder (make_cfg for the Llama, t5_cfg in the T5 tests), so both families share one check.
    """
    from stages.engine.prompted_model import PromptedModel

    cfg_a = build_cfg(tmp_path / "a", model_dir, max_steps=2)
    train(cfg_a)
    a_table = tables(cfg_a.model.artifact_path)["prompt_table.squad"]
    tr = write_jsonl(tmp_path / "sent_train.jsonl", sent_records(n_train))
    va = write_jsonl(tmp_path / "sent_val.jsonl", sent_records(4, seed=3))
    cfg_b = build_cfg(tmp_path / "b", model_dir, templates=(squad_template, SENT_T), new_tasks=("sentiment",), train=tr,
                      val=va, max_steps=2, restore_path=cfg_a.model.artifact_path, existing_tasks=["squad"])
    train(cfg_b)
    tb = tables(cfg_b.model.artifact_path)
    assert torch.equal(tb["prompt_table.squad"], a_table)          # bit-identical
    assert tb["prompt_table.sentiment"].shape == (6, hidden)
    pm = PromptedModel.load(cfg_b.model.artifact_path)
    mixed = [squad_records(1)[0], {"taskname": "sentiment", "review": "good dog"}, squad_records(2, seed=9)[1]]
    out = pm.generate(mixed, tokens_to_generate=4, batch_size=3, stop_strings=(), progress=False)
    single = [pm.generate([r], tokens_to_generate=4, stop_strings=(), progress=False)[0] for r in mixed]
    assert out == single and len(out) == 3
