"""The prompt_learning STAGE under tensor, pipeline and data parallelism == the single-process stage.

A tiny random Llama folder (``tests.support.tiny_models`` llama: hidden 64, 4 heads, 2 KV heads, 4 layers;
a byte-level BPE tokenizer trained offline, deterministically) and tiny SQuAD-like + sentiment JSONL files (two new tasks trained
together: one table per task, one of them with virtual tokens at two markers). The 14 training examples make the
last global batch short and the 6 validation examples leave a short validation tail.

* reference: ONE process, TP = PP = 1, ``micro_batch_size = global_batch_size`` (the plain engine);
* 2 gloo processes forked from pytest run ``stages.common.entry.run_stage(train)`` -- exactly what
  ``stages/prompt_learning/run.py`` does -- for TP=2, PP=2 (GPipe and 1F1B) and DP=2;
* per-step train losses, val losses and the final prompt tables must agree to 1e-5; checkpoints resume across
  layouts (TP=2 checkpoint -> one process and the reverse); the artifact of the TP=2 run loads in the evaluation
  API (``PromptedModel``, one process).

``test_main_py_runs_tensor_parallel_through_torchrun`` goes through ``python3 main.py ...`` (launcher -> local
executor -> ``python -m torch.distributed.run --nproc_per_node=2``).

Under ``PROMPTLAUNCH_TEST_DEVICE=cuda`` (tests/support/dist.py) every run, the reference included, uses
``trainer.accelerator=gpu`` and NCCL; the 2-process tests need 2 GPUs and skip with fewer.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")
pytest.importorskip("transformers")

from omegaconf import OmegaConf  # noqa: E402

from tests.support.dist import TOL, accelerator, needs_ranks  # noqa: E402

STEPS = 4
SQUAD_T = {"taskname": "squad", "total_virtual_tokens": 4, "virtual_token_splits": [4], "truncate_field": "context",
           "prompt_template": "<|VIRTUAL_PROMPT_0|>Context: {context} Question: {question} Answer: {answer}",
           "answer_only_loss": True, "answer_field": "answer"}
SENT_T = {"taskname": "sentiment", "total_virtual_tokens": 6, "virtual_token_splits": [3, 3], "truncate_field": "review",
          "prompt_template": "<|VIRTUAL_PROMPT_0|>Review: {review}<|VIRTUAL_PROMPT_1|> Sentiment: {label}",
          "answer_only_loss": True, "answer_field": "label"}
LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    "pp2_gpipe": dict(pipeline_model_parallel_size=2, pipeline_schedule="gpipe"),
    "pp2_1f1b": dict(pipeline_model_parallel_size=2, pipeline_schedule="1f1b"),
    "dp2": dict(),
}


# ----------------------------------------------------------------------------------------------------------
# fixtures: tiny Llama folder + data, built offline and deterministically
# ----------------------------------------------------------------------------------------------------------
def make_tiny_llama(path: Path) -> Path:
    """hidden 64, 4 attention heads, 2 KV heads, intermediate 128, 4 layers: TP=2 and PP=2 both fit."""
    from tests.support.tiny_models import build

    return build("llama", path, max_position_embeddings=256)


def records(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = ["Paris", "water", "fox", "dog", "capital", "boils", "quick", "lazy", "brown", "France"]
    out = []
    for i in range(n):
        if i % 3 == 2:
            lab = rng.choice(["positive", "negative"])
            out.append({"taskname": "sentiment", "review": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))),
                        "label": lab})
        else:
            ans = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))   # answers of varying length
            ctx = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) + f" {ans}."
            out.append({"taskname": "squad", "context": ctx, "question": f"Which word {i % 4}?", "answer": ans})
    return out


def write_jsonl(path: Path, recs: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_tp") / "llama"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tp_data")
    return write_jsonl(d / "train.jsonl", records(14, seed=0)), write_jsonl(d / "val.jsonl", records(6, seed=5))


def make_cfg(tmp: Path, model_dir: str, data: tuple[str, str], *, devices: int = 1, mbs: int = 2, max_steps: int = STEPS,
             style: str = "prompt-tuning", **model_over):
    results = tmp / "results"
    cfg = {
        "run": {"name": "tp_test", "results_dir": str(results)},
        "trainer": {"accelerator": accelerator(), "devices": devices, "num_nodes": 1, "precision": "32", "max_epochs": -1,
                    "max_steps": max_steps, "log_every_n_steps": 1, "val_check_interval": 2, "limit_val_batches": 1.0,
                    "gradient_clip_val": 1.0, "accumulate_grad_batches": 1, "enable_progress_bar": False},
        "exp_manager": {"explicit_log_dir": str(results / "log"), "resume_if_exists": True,
                        "create_tensorboard_logger": False, "create_csv_logger": False, "create_wandb_logger": False,
                        "checkpoint_callback_params": {"monitor": "val_loss", "mode": "min", "save_top_k": 1}},
        "model": {
            "seed": 3, "language_model_path": model_dir, "virtual_prompt_style": style,
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
            "global_batch_size": 4, "micro_batch_size": mbs, "restore_path": None, "existing_tasks": [],
            "new_tasks": ["squad", "sentiment"], "task_templates": [dict(SQUAD_T), dict(SENT_T)],
            "prompt_tuning": {"new_prompt_init_methods": ["random"], "init_std": 0.5},
            "p_tuning": {"encoder_type": "mlp", "num_layers": 2, "encoder_hidden": 32, "dropout": 0.0, "init_std": 0.1},
            "data": {"train_ds": [data[0]], "validation_ds": [data[1]], "add_eos": True, "shuffle": True,
                     "num_workers": 0, "max_seq_length": 64, "min_seq_length": 1},
            "optim": {"name": "adamw", "lr": 0.05, "weight_decay": 0.01, "betas": [0.9, 0.98],
                      "sched": {"name": "cosine", "warmup_steps": 1, "min_lr": 0.0}},
            "artifact_path": str(results / "artifact"),
        },
    }
    c = OmegaConf.create(cfg)
    for k, v in model_over.items():
        OmegaConf.update(c, f"model.{k}", v, merge=False)
    return c


def outputs(cfg) -> dict:
    from safetensors.torch import load_file

    log_dir = Path(cfg.exp_manager.explicit_log_dir)
    hist = json.loads((log_dir / "loss_history.json").read_text())
    return {"train": hist["train"], "val": hist["val"],
            "tables": load_file(str(Path(cfg.model.artifact_path) / "prompts.safetensors"))}


def assert_same(got: dict, ref: dict, what: str) -> None:
    assert [s for s, _ in got["train"]] == [s for s, _ in ref["train"]] == list(range(1, STEPS + 1)), what
    assert [s for s, _ in got["val"]] == [s for s, _ in ref["val"]], what
    torch.testing.assert_close(torch.tensor([v for _, v in got["train"]]), torch.tensor([v for _, v in ref["train"]]),
                               **TOL, msg=lambda m: f"{what} train losses: {m}")
    torch.testing.assert_close(torch.tensor([v for _, v in got["val"]]), torch.tensor([v for _, v in ref["val"]]),
                               **TOL, msg=lambda m: f"{what} val losses: {m}")
    assert sorted(got["tables"]) == sorted(ref["tables"])
    for k in ref["tables"]:
        torch.testing.assert_close(got["tables"][k], ref["tables"][k], **TOL, msg=lambda m: f"{what} {k}: {m}")


class StopAt:
    """Ends fit after optimiser step ``n`` on every rank (the step-``n`` validation has saved last.ckpt)."""

    def __new__(cls, n: int):
        import pytorch_lightning as pl

        class _Stop(pl.Callback):
            def on_validation_end(self, trainer, module):
                if trainer.global_step >= n:
                    trainer.should_stop = True

        return _Stop()


def run_stage_entry(cfg_path: str) -> int:
    """What stages/prompt_learning/run.py does."""
    from stages.common.entry import run_stage
    from stages.prompt_learning.train import train

    return run_stage(train, ["--config", cfg_path])


# ----------------------------------------------------------------------------------------------------------
# the 2-process worker: every layout in turn, through the stage entry
# ----------------------------------------------------------------------------------------------------------
def _worker(rank, world, jobs):
    from stages.prompt_learning.train import train

    timings = {}
    for name, cfg_path, stop in jobs:
        t0 = time.monotonic()
        if stop:
            train(OmegaConf.load(cfg_path), callbacks=[StopAt(stop)])
        else:
            rc = run_stage_entry(cfg_path)
            assert rc == 0, f"{name}: stage exited with {rc} on rank {rank}"
        timings[name] = round(time.monotonic() - t0, 1)
    return timings


@pytest.mark.dist
@needs_ranks(2)
def test_tp_pp_dp_stage_equals_single_process(tmp_path, tiny_llama, data):
    from stages.prompt_learning.train import train
    from tests.support.dist import run_distributed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.monotonic()
    # reference: one process, the whole global batch as one micro batch (the plain engine path)
    ref_cfg = make_cfg(tmp_path / "ref", tiny_llama, data, mbs=4)
    train(ref_cfg)
    ref = outputs(ref_cfg)
    # a single-process run stopped after step 2; a TP=2 run resumes it below
    one_part = make_cfg(tmp_path / "one_part", tiny_llama, data, mbs=4)
    train(one_part, callbacks=[StopAt(2)])
    t_ref = time.monotonic() - t0

    jobs = []
    cfgs = {}
    for name, sizes in LAYOUTS.items():
        cfgs[name] = make_cfg(tmp_path / name, tiny_llama, data, devices=2, **sizes)
    # TP=2 resuming the single-process checkpoint, and a TP=2 run stopped at step 2 (resumed by one process below)
    cfgs["tp2_resumes_one"] = one_part.copy()
    OmegaConf.update(cfgs["tp2_resumes_one"], "trainer.devices", 2)
    OmegaConf.update(cfgs["tp2_resumes_one"], "model.tensor_model_parallel_size", 2)
    cfgs["tp2_part"] = make_cfg(tmp_path / "tp2_part", tiny_llama, data, devices=2, mbs=4, tensor_model_parallel_size=2)
    for name, cfg in cfgs.items():
        path = tmp_path / f"{name}.yaml"
        OmegaConf.save(cfg, path)
        jobs.append((name, str(path), 2 if name == "tp2_part" else 0))
    t1 = time.monotonic()
    timings = run_distributed(_worker, 2, jobs, timeout=240)[0]
    t_dist = time.monotonic() - t1

    for name in LAYOUTS:
        assert_same(outputs(cfgs[name]), ref, name)
    assert_same(outputs(cfgs["tp2_resumes_one"]), ref, "1 process -> TP=2 resume")

    # one process resumes the TP=2 checkpoint
    part = cfgs["tp2_part"].copy()
    OmegaConf.update(part, "trainer.devices", 1)
    OmegaConf.update(part, "model.tensor_model_parallel_size", 1)
    train(part)
    assert_same(outputs(part), ref, "TP=2 -> 1 process resume")

    # the TP=2 checkpoint holds the prompt state only, with the single-process engine's keys
    ckpt = torch.load(Path(cfgs["tp2"].exp_manager.explicit_log_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert sorted(ckpt["state_dict"]) == ["prompts.tables.task0", "prompts.tables.task1"]
    assert all(type(v) is torch.Tensor for v in ckpt["state_dict"].values())

    # the TP=2 artifact is evaluated by one process with the evaluation stage's API
    from stages.engine.prompted_model import PromptedModel

    pm = PromptedModel.load(cfgs["tp2"].model.artifact_path)
    assert pm.describe()["virtual_tokens"] == {"squad": 4, "sentiment": 6}
    answers = pm.generate(records(3, seed=9), tokens_to_generate=3, batch_size=3, stop_strings=(), progress=False)
    assert len(answers) == 3
    print(f"\nreference {t_ref:.1f}s; 2-process runs {t_dist:.1f}s: {timings}")


@pytest.mark.dist
@needs_ranks(2)
def test_p_tuning_tp2_equals_single_process(tmp_path, tiny_llama, data):
    """P-tuning (MLP encoder, dropout 0) under TP=2, two tasks (two encoders in one stacked table)."""
    from stages.prompt_learning.train import train
    from tests.support.dist import run_distributed

    ref_cfg = make_cfg(tmp_path / "ref", tiny_llama, data, mbs=4, style="p-tuning", max_steps=STEPS)
    train(ref_cfg)
    cfg = make_cfg(tmp_path / "tp2", tiny_llama, data, devices=2, style="p-tuning", tensor_model_parallel_size=2)
    OmegaConf.save(cfg, tmp_path / "tp2.yaml")
    run_distributed(_worker, 2, [("tp2_ptuning", str(tmp_path / "tp2.yaml"), 0)], timeout=120)
    assert_same(outputs(cfg), outputs(ref_cfg), "p-tuning tp2")


# ----------------------------------------------------------------------------------------------------------
# through main.py: launcher -> local executor -> torchrun -> stages/prompt_learning/run.py
# ----------------------------------------------------------------------------------------------------------
def _main_args(tmp_path: Path, model_dir: str, *extra: str) -> list[str]:
    squad = [r for r in records(16, seed=0) if r["taskname"] == "squad"][:8]
    train = write_jsonl(tmp_path / "squad_train.jsonl", squad)
    val = write_jsonl(tmp_path / "squad_val.jsonl", squad[:4])
    return ["stages=[prompt_learning]", f"base_results_dir={tmp_path}/results",
            f"prompt_learning.model.language_model_path={model_dir}",
            f"prompt_learning.model.data.train_ds=[{train}]", f"prompt_learning.model.data.validation_ds=[{val}]",
            "prompt_learning.model.global_batch_size=4", "prompt_learning.model.micro_batch_size=2",
            "prompt_learning.trainer.max_steps=2", "prompt_learning.trainer.val_check_interval=2",
            "prompt_learning.trainer.enable_progress_bar=false", *extra]


@pytest.mark.dist
@needs_ranks(2)
def test_main_py_runs_tensor_parallel_through_torchrun(tmp_path, tiny_llama):
    from tests.support.launcher import run_main

    args = _main_args(tmp_path, tiny_llama, "prompt_learning.model.tensor_model_parallel_size=2",
                      "prompt_learning.trainer.devices=2", f"prompt_learning.trainer.accelerator={accelerator()}")
    t0 = time.monotonic()
    p = run_main(args, env={"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    scripts = list((tmp_path / "results").rglob("*_local.sh"))
    assert len(scripts) == 1
    assert "-m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=2" in scripts[0].read_text()
    log_text = next((tmp_path / "results").rglob("log-*.out")).read_text()
    assert "parallel layout: TP 2 x PP 1 (-) x DP 1 = 2 processes" in log_text
    assert "All distributed processes registered. Starting with 2 processes" in log_text
    summaries = list((tmp_path / "results").rglob("prompt_learning_summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["steps"] == 2 and Path(summary["artifact_path"], "prompts.safetensors").is_file()
    print(f"\nmain.py TP=2 through torchrun: {took:.1f}s")


@pytest.mark.parametrize(
    "extra,msg",
    [
        # TP does not divide the heads of the local folder (4 heads, 2 KV heads)
        (["prompt_learning.model.tensor_model_parallel_size=4", "prompt_learning.trainer.devices=4",
          "prompt_learning.model.global_batch_size=4", "prompt_learning.model.micro_batch_size=4"],
         r"^error: prompt_learning.model.tensor_model_parallel_size=4 does not divide the model's num_key_value_heads=2"),
        # TP x PP does not divide the world
        (["prompt_learning.model.tensor_model_parallel_size=2", "prompt_learning.model.pipeline_model_parallel_size=2",
          "prompt_learning.trainer.devices=2"], r"^error: prompt_learning.model.tensor_model_parallel_size x prompt_learning.model.pipeline_model_parallel_size = 2x2 does not divide the world size 2"),
        # 1F1B needs at least as many micro batches as stages
        (["prompt_learning.model.pipeline_model_parallel_size=2", "prompt_learning.trainer.devices=2",
          "prompt_learning.model.micro_batch_size=4"], r"fewer than the 2 pipeline stages that 1F1B needs"),
        (["prompt_learning.model.pipeline_model_parallel_size=2", "prompt_learning.trainer.devices=2",
          "prompt_learning.model.pipeline_schedule=interleaved"], r"pipeline_schedule: 'interleaved' is not one of 1f1b, gpipe"),
        (["prompt_learning.model.tensor_model_parallel_size=2", "prompt_learning.trainer.devices=2",
          "prompt_learning.model.virtual_prompt_style=p-tuning", "prompt_learning.model.p_tuning.dropout=0.1"],
         r"p_tuning.dropout=0.1: P-tuning with tensor/pipeline parallelism needs dropout 0"),
    ],
)
def test_impossible_layout_rejected_before_launch(tmp_path, tiny_llama, extra, msg):
    """main.py (no dry run) stops with ONE error line and exit code 2; nothing is started."""
    from tests.support.launcher import run_main

    p = run_main(_main_args(tmp_path, tiny_llama, *extra))
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert re.search(msg, lines[0]), lines[0]
    assert not list((tmp_path / "results").rglob("*.sh"))


def test_embedded_smollm2_cannot_use_tp2(tmp_path):
    """The embedded SmolLM2 has 9 heads and 3 KV heads: the error says so and points at a tiny Llama folder."""
    from stages.common.errors import UserError
    from launcher.schema import resolve_all
    from launcher.validate import validate
    from tests.support.launcher import compose_cfg

    cfg = compose_cfg([f"base_results_dir={tmp_path}/results", f"data_dir={tmp_path}/data", "dry_run=true",
                       "prompt_learning.model.tensor_model_parallel_size=2", "prompt_learning.trainer.devices=2",
                       "prompt_learning.model.micro_batch_size=4"])
    resolve_all(cfg)
    with pytest.raises(UserError, match=r"does not divide the model's num_attention_heads=9: embedded:smollm2-135m-instruct "
                                        r"has 9 attention heads and 3 key/value heads.*tiny random Llama") as exc:
        validate(cfg)
    assert "\n" not in str(exc.value)


@pytest.mark.dist
@needs_ranks(2)
def test_t5_data_parallel_equals_single_process(tmp_path, data):
    """DP=2 is architecture-agnostic (the family's own loss, sums all-reduced): a tiny random T5 too."""
    from tests.support.tiny_models import build
    from stages.prompt_learning.train import train
    from tests.support.dist import run_distributed

    t5 = str(build("t5", tmp_path / "t5_tiny_random"))
    squad = {**SQUAD_T, "prompt_template": "<|VIRTUAL_PROMPT_0|> Question: {question} Context: {context} Answer: {answer}"}
    sent = {**SENT_T, "prompt_template": "<|VIRTUAL_PROMPT_0|>Review: {review}<|VIRTUAL_PROMPT_1|> Sentiment: {label}"}
    over = dict(task_templates=[squad, sent])
    ref_cfg = make_cfg(tmp_path / "ref", t5, data, mbs=4, **over)
    train(ref_cfg)
    cfg = make_cfg(tmp_path / "dp2", t5, data, devices=2, **over)
    OmegaConf.save(cfg, tmp_path / "dp2.yaml")
    run_distributed(_worker, 2, [("t5_dp2", str(tmp_path / "dp2.yaml"), 0)], timeout=120)
    assert_same(outputs(cfg), outputs(ref_cfg), "t5 dp2")
    # ... while tensor parallelism of a T5 is refused before launch (Llama architecture only)
    from stages.common.errors import UserError
    from launcher.schema import resolve_all
    from launcher.validate import validate
    from tests.support.launcher import compose_cfg

    lc = compose_cfg([f"base_results_dir={tmp_path}/results", f"data_dir={tmp_path}/data", "dry_run=true",
                      "stages=[prompt_learning]", f"prompt_learning.model.language_model_path={t5}",
                      "prompt_learning.model.tensor_model_parallel_size=2", "prompt_learning.trainer.devices=2",
                      "prompt_learning.model.micro_batch_size=4"])
    resolve_all(lc)
    with pytest.raises(UserError, match=r"model_type 't5' is not supported by tensor/pipeline-parallel prompt learning"):
        validate(lc)
