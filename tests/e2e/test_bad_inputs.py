"""The bad-input suite: every case ends with ONE ``error:`` line that names the key, file or file:line at fault and
says how to fix it, a non-zero exit code, no traceback, and no partial output.

The suite = the 17 command-line cases of ``tests.support.launcher.BAD_INPUTS`` (run by
``tests/launcher/test_launcher.py``, counted here, not repeated) + the pre-launch cases below, run through
``main.py`` like a user would (the launcher rejects them before anything is written or started) + the
data/model/checkpoint cases below, which only the stage can see, run through the stage entry
(``stages.common.entry.run_stage``, exactly what ``stages/<stage>/run.py`` calls).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.support import nemo
from tests.support.launcher import BAD_INPUTS as LAUNCHER_CASES, run_main

# ---- pre-launch: main.py, one line, exit 2, nothing written ---------------------------------------------------
PRELAUNCH = [
    (["prompt_learning.model.global_batch_size=abc"], "prompt_learning.model.global_batch_size: must be a positive integer, got 'abc'"),
    (["prompt_learning.model.micro_batch_size=0"], "prompt_learning.model.micro_batch_size: must be a positive integer, got 0"),
    (["prompt_learning.model.data.max_seq_length=-5"], "prompt_learning.model.data.max_seq_length: must be a positive integer, got -5"),
    (["prompt_learning.model.data.max_train_examples=0"], "prompt_learning.model.data.max_train_examples: must be a positive integer"),
    (["prompt_learning.trainer.max_steps=0"], "prompt_learning.trainer.max_steps: must be a positive integer or -1"),
    (["prompt_learning.model.optim.name=sgd"], "prompt_learning.model.optim.name: 'sgd' is not one of adamw, adam"),
    (["prompt_learning.model.optim.sched.name=step"], "prompt_learning.model.optim.sched.name: 'step' is not one of cosine"),
    (["prompt_learning.trainer.reuse_host_memory=maybe"], "prompt_learning.trainer.reuse_host_memory: must be true or false, got 'maybe'"),
    (["evaluation.trainer.reuse_host_memory=1"], "evaluation.trainer.reuse_host_memory: must be true or false, got 1"),
    (["prompt_learning.trainer.compile=fast"], "prompt_learning.trainer.compile: must be true or false, got 'fast'"),
    (["prompt_learning.trainer.compile=true", "prompt_learning.trainer.devices=2"],
     "prompt_learning.trainer.compile: runs in one process only, this run has 2 (trainer.devices x trainer.num_nodes)"),
    (["evaluation.data.offset=-1"], "evaluation.data.offset: must be an integer >= 0, got -1"),
    (["evaluation.inference.prompt_lookup_num_tokens=-2"],
     "evaluation.inference.prompt_lookup_num_tokens: must be an integer >= 0 (0 = off), got -2"),
    (["evaluation.inference.prompt_lookup_pass_budget=0"],
     "evaluation.inference.prompt_lookup_pass_budget: must be an integer >= 1 or null (no limit), got 0"),
    (["prompt_learning.model.language_model_path=/nonexistent/model"],
     "prompt_learning.model.language_model_path: '/nonexistent/model' does not exist; set prompt_learning.model.language_model_path to a Hugging Face model folder"),
    (["prompt_learning.model.language_model_path={tmp}/not_a_model"],
     "folder has no config.json, so it is not a Hugging Face model folder; point it at the folder that holds config.json"),
    (["prompt_learning.exp_manager.checkpoint_callback_params.every_n_train_steps=0"],
     "prompt_learning.exp_manager.checkpoint_callback_params.every_n_train_steps: must be a positive integer, got 0"),
    (["cluster_type=slurm", "cluster.signal=B:USR1@120"], "cluster.signal: 'B:USR1@120' would signal only the batch shell"),
    (["cluster_type=slurm", "cluster.signal=USR1@7200"],
     "cluster.signal: USR1@7200 asks for the signal 7200 s before the time limit, but prompt_learning.run.time_limit is 01:00:00"),
    # strict keys: a key nothing reads is refused with the nearest known one
    (["+prompt_learning.trainer.max_step=5"],
     "prompt_learning.trainer.max_step: unknown key (nothing reads it); did you mean prompt_learning.trainer.max_steps?"),
    (["prompt_learning.trainer.max_step=5"],
     "command line: prompt_learning.trainer.max_step: unknown key (nothing reads it); did you mean prompt_learning.trainer.max_steps?"),
    (["+prompt_learning.max_steps=5"],
     "prompt_learning.max_steps: unknown key (nothing reads it); did you mean prompt_learning.trainer.max_steps?"),
    (["stages=[data_preparation]", "+evaluation.data.max_example=5"],   # a stage that is not run is checked too
     "evaluation.data.max_example: unknown key (nothing reads it); did you mean evaluation.data.max_examples?"),
    (["+data_preparation.forced=true"], "data_preparation.forced: unknown key (nothing reads it); did you mean data_preparation.force?"),
    (["+prompt_learning.model.task_templates.0.answer_feld=x"],
     "prompt_learning.model.task_templates[0].answer_feld: unknown key (nothing reads it); did you mean "
     "prompt_learning.model.task_templates[0].answer_field?"),
    (["+cluster.partitio=batch"], "cluster.partitio: unknown key (nothing reads it); did you mean cluster.partition?"),
    (["+dryrun=true"], "dryrun: unknown key (nothing reads it); did you mean dry_run?"),
    (["+prompt_learning.run.foo=1"], "prompt_learning.run.foo: unknown key (nothing reads it); remove it (known keys under "
     "prompt_learning.run: convert_dir, convert_name, dependency, model_train_name, name, nodes, results_dir, task_name, time_limit)"),
    (["--config-dir", "{tmp}/my_conf", "prompt_learning=typo"],   # a user's own config is held to the same keys
     "prompt_learning.model.optim.sched.warmup: unknown key (nothing reads it); did you mean "
     "prompt_learning.model.optim.sched.warmup_steps?"),
    # values caught before submission instead of in the job
    (["prompt_learning.trainer.precision=fp8"],
     "prompt_learning.trainer.precision: 'fp8' is not one of auto, 32, 32-true, bf16-mixed, bf16-true, bf16, 16-mixed, 16, "
     "16-true; set e.g. prompt_learning.trainer.precision=32"),
    (["evaluation.trainer.precision=8"], "evaluation.trainer.precision: '8' is not one of auto, 32, 32-true"),
    (["prompt_learning.trainer.val_check_interval=0"],
     "prompt_learning.trainer.val_check_interval: must be an integer >= 1 (train batches between validations) or a fraction "
     "in (0, 1] of an epoch, got 0"),
    (["prompt_learning.trainer.val_check_interval=1.5"], "prompt_learning.trainer.val_check_interval: must be an integer >= 1"),
    (["prompt_learning.trainer.log_every_n_steps=0"], "prompt_learning.trainer.log_every_n_steps: must be a positive integer, got 0"),
    (["prompt_learning.trainer.gradient_clip_val=-1"], "prompt_learning.trainer.gradient_clip_val: must be a number >= 0, got -1"),
    (["prompt_learning.model.optim.lr=0"], "prompt_learning.model.optim.lr: must be a number > 0, got 0"),
    (["prompt_learning.model.optim.sched.min_lr=-1e-5"], "prompt_learning.model.optim.sched.min_lr: must be a number >= 0, got -1e-05"),
    (["prompt_learning.model.optim.weight_decay=-0.1"], "prompt_learning.model.optim.weight_decay: must be a number >= 0, got -0.1"),
    (["prompt_learning.model.optim.betas=[0.9,1.2]"], "prompt_learning.model.optim.betas[1]: must be a number in [0, 1), got 1.2"),
    (["prompt_learning.model.optim.betas=[0.9]"],
     "prompt_learning.model.optim.betas: must be two numbers in [0, 1) such as [0.9, 0.98], got [0.9]"),
    (["prompt_learning.model.p_tuning.dropout=1.5"], "prompt_learning.model.p_tuning.dropout: must be a number in [0, 1), got 1.5"),
    (["prompt_learning.model.global_batch_size=4"],
     "prompt_learning.model.global_batch_size: 4 is smaller than prompt_learning.model.micro_batch_size x data-parallel size = "
     "8x1; raise it or lower the micro batch size"),
    (["prompt_learning.model.data.max_seq_length=16"],
     "prompt_learning.model.data.max_seq_length: 16 leaves no room for text after the 20 virtual tokens of task 'squad'; "
     "raise it well above 20"),
    (["prompt_learning.model.data.min_seq_length=500"],
     "prompt_learning.model.data.min_seq_length: 500 is above prompt_learning.model.data.max_seq_length=256, so every example "
     "would be dropped; lower it"),
    (["prompt_learning.model.data.num_workers=-1"],
     "prompt_learning.model.data.num_workers: must be an integer >= 0 (0 = load in the main process), got -1"),
    (["evaluation.inference.tokens_to_generate=0"], "evaluation.inference.tokens_to_generate: must be an integer >= 1, got 0"),
    (["evaluation.data.batch_size=0"], "evaluation.data.batch_size: must be an integer >= 1, got 0"),
    # a folder where a file is expected, a file where a folder is
    (["prompt_learning.model.data.train_ds=[{tmp}/not_a_model]"],
     "prompt_learning.model.data.train_ds: '{tmp}/not_a_model' is a folder, not a file; name the file itself"),
    (["evaluation.data.test_ds={tmp}/not_a_model"],
     "evaluation.data.test_ds: '{tmp}/not_a_model' is a folder, not a file; name the file itself"),
    (["wandb_api_key_file={tmp}/not_a_model"], "wandb_api_key_file: '{tmp}/not_a_model' is a folder, not a file; name the file itself"),
    (["evaluation.model.artifact_path={tmp}/not_a_model/weights.bin"],
     "evaluation.model.artifact_path: '{tmp}/not_a_model/weights.bin' is a file, not a folder; name the folder"),
    (["prompt_learning.model.language_model_path={tmp}/not_a_model/weights.bin"],
     "prompt_learning.model.language_model_path={tmp}/not_a_model/weights.bin: is a file but not a .gguf"),
    # a NeMo GPT .nemo no Hugging Face class computes exactly: its model_config.yaml is read before launch
    (["prompt_learning.model.language_model_path={tmp}/reglu.nemo"],
     "prompt_learning.model.language_model_path={tmp}/reglu.nemo: model_config.yaml activation: reglu with "
     "learned_absolute positions (GPT-2 needs gelu)"),
    (["prompt_learning.model.nemo_path={tmp}/p_tuned.ckpt"],
     "prompt_learning.model.nemo_path: '{tmp}/p_tuned.ckpt' must end with .nemo"),
]


@pytest.mark.parametrize("args,needle", PRELAUNCH, ids=[" ".join(a) for a, _ in PRELAUNCH])
def test_prelaunch_bad_input(tmp_path, args, needle):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "weights.bin").write_bytes(b"x")
    nemo.write_nemo(tmp_path / "reglu.nemo", nemo.gpt2_config(activation="reglu"), {})
    (tmp_path / "my_conf" / "prompt_learning").mkdir(parents=True)
    (tmp_path / "my_conf" / "prompt_learning" / "typo.yaml").write_text(
        "defaults:\n  - /prompt_learning/gpt/squad_cpu@_here_\n  - _self_\nmodel:\n  optim:\n    sched:\n      warmup: 5\n")
    results = tmp_path / "results"
    args = [a.format(tmp=tmp_path) for a in args]
    flags = args[:2] if args[0] == "--config-dir" else []   # Hydra takes its flags before the overrides
    out = run_main([*flags, f"base_results_dir={results}", f"data_dir={tmp_path}/data", *args[len(flags):]])
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle.format(tmp=tmp_path) in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not results.exists(), "nothing may be written for a rejected config"


# ---- stage level: the stage entry, one line, exit 2, no artifact / checkpoint / summary ---------------------------
torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

from omegaconf import OmegaConf  # noqa: E402

from stages.common.entry import run_stage  # noqa: E402
from tests.support.records import squad_records  # noqa: E402
from tests.support.templates import SQUAD_T  # noqa: E402
from tests.support.training import make_cfg  # noqa: E402

RECS = squad_records(8)


def _jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _model_copy(tmp: Path, tiny: str, name: str) -> Path:
    folder = tmp / name
    shutil.copytree(tiny, folder)
    return folder


def _artifact_of_another_model(tmp: Path) -> Path:
    from stages.engine.template import parse_templates
    from stages.engine.artifact import save_artifact

    return save_artifact(tmp / "foreign_artifact", tables={"squad": torch.zeros(4, 48)}, templates=parse_templates([SQUAD_T]),
                         style="prompt-tuning", add_eos=True, max_seq_length=128, training={},
                         base={"language_model_path": "/models/other", "fingerprint": {"sha256": "0123456789abcdef"},
                               "hidden_size": 48})


def _stage_case(case: str, tmp: Path, tiny: str):
    """(stage config, expected text, expected exit code); files are created under ``tmp``."""
    f = tmp / f"{case}.jsonl"
    if case == "malformed_jsonl_line":
        bad = _jsonl(f, [*RECS[:2], '{"taskname": "squad", "context": "x"', *RECS[2:]])
        return make_cfg(tmp, tiny, train=bad), f"{bad}:3: not valid JSON (Expecting ',' delimiter); fix or remove the line"
    if case == "empty_answer":
        bad = _jsonl(f, [*RECS[:3], {**RECS[3], "answer": ""}])
        return make_cfg(tmp, tiny, train=bad), f"{bad}:4: field 'answer' (the answer) is empty"
    if case == "answer_list_empty":
        bad = _jsonl(f, [RECS[0], {**RECS[1], "answer": []}])
        return make_cfg(tmp, tiny, train=bad), f"{bad}:2: field 'answer' must be a non-empty list of answer strings"
    if case == "no_room_for_context_after_truncation":
        long_q = {**RECS[0], "question": " ".join(["capital"] * 60)}
        cfg = make_cfg(tmp, tiny, train=_jsonl(f, [long_q] * 3))
        OmegaConf.update(cfg, "model.data.max_seq_length", 40, merge=False)
        return cfg, f"model.data.train_ds: no usable examples (all 3 dropped): e.g. {f}:1 needs"
    if case == "unknown_taskname":
        bad = _jsonl(f, [RECS[0], {**RECS[1], "taskname": "boolq"}])
        return make_cfg(tmp, tiny, train=bad), f"{bad}:2: taskname 'boolq' is not one of the tasks being trained (['squad'])"
    if case == "wrong_type_in_record":
        bad = _jsonl(f, [RECS[0], {**RECS[1], "context": {"text": "x"}}])
        return make_cfg(tmp, tiny, train=bad), f"{bad}:2: field 'context' must be text, got a dict"
    if case == "empty_train_file":
        bad = _jsonl(f, [])
        return make_cfg(tmp, tiny, train=bad), f"model.data.train_ds: {bad} has no records"
    if case == "model_config_json_corrupt":
        folder = _model_copy(tmp, tiny, "bad_config")
        (folder / "config.json").write_text("{not json")
        cfg = make_cfg(tmp, tiny)
        OmegaConf.update(cfg, "model.language_model_path", str(folder), merge=False)
        return cfg, f"model.language_model_path={folder}: {folder / 'config.json'} is unreadable or not JSON"
    if case == "model_weights_truncated":
        folder = _model_copy(tmp, tiny, "bad_weights")
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
        cfg = make_cfg(tmp, tiny)
        OmegaConf.update(cfg, "model.language_model_path", str(folder), merge=False)
        return cfg, f"model.language_model_path={folder}: cannot load the model (SafetensorError"
    if case == "model_without_tokenizer":
        folder = tmp / "no_tokenizer"
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(Path(tiny) / name, folder / name)
        cfg = make_cfg(tmp, tiny)
        OmegaConf.update(cfg, "model.language_model_path", str(folder), merge=False)
        return cfg, f"model.language_model_path={folder}: the model folder has no tokenizer files"
    if case == "incompatible_artifact":
        art = _artifact_of_another_model(tmp)
        sent = {**SQUAD_T, "taskname": "sent"}
        cfg = make_cfg(tmp, tiny, templates=(SQUAD_T, sent), new_tasks=("sent",),
                       train=_jsonl(f, [{**r, "taskname": "sent"} for r in RECS]))
        OmegaConf.update(cfg, "model.existing_tasks", ["squad"], merge=False)
        OmegaConf.update(cfg, "model.restore_path", str(art), merge=False)
        return cfg, f"artifact {art} was trained on base model /models/other (fingerprint 0123456789abcdef/-, hidden 48)"
    if case == "corrupt_checkpoint":
        cfg = make_cfg(tmp, tiny)
        ck = Path(cfg.exp_manager.explicit_log_dir) / "checkpoints"
        ck.mkdir(parents=True)
        (ck / "last.ckpt").write_bytes(b"PK\x03\x04 not a whole checkpoint")
        (ck / "last.prev.ckpt").write_bytes(b"")
        return cfg, (f"{ck / 'last.ckpt'}: checkpoint is corrupt or truncated (last.ckpt: RuntimeError: PytorchStreamReader "
                     f"failed reading zip archive")
    if case == "checkpoint_of_another_config":
        from tests.support.training import train

        cfg = make_cfg(tmp, tiny, max_steps=1)
        train(cfg)   # a real checkpoint, written for 24 training examples
        OmegaConf.update(cfg, "model.data.train_ds", [_jsonl(f, squad_records(30))], merge=False)
        OmegaConf.update(cfg, "trainer.max_steps", 2, merge=False)
        shutil.rmtree(cfg.model.artifact_path)   # the outputs of that earlier run: the failed one must write none
        for name in ("prompt_learning_summary.json", "loss_curve.png"):
            (Path(cfg.exp_manager.explicit_log_dir) / name).unlink()
        ck = Path(cfg.exp_manager.explicit_log_dir) / "checkpoints"
        return cfg, (f"{ck / 'last.ckpt'}: checkpoint was written by a run with other settings "
                     f"(prompt_learning.model.data.train_ds (content), prompt_learning.train_examples (derived)); choose a "
                     f"new prompt_learning.run.name (a new folder), start over with "
                     f"prompt_learning.exp_manager.resume_if_exists=false (the previous outputs are moved aside), or "
                     f"continue it anyway with prompt_learning.exp_manager.resume_ignore_changes=[model.data.train_ds,"
                     f"train_examples]")
    if case in ("non_utf8_train_file", "non_utf8_validation_file"):
        f.write_bytes(json.dumps(RECS[0]).encode() + b"\n" + json.dumps(RECS[1]).encode()[:20] + b"\xff\xfe" + b"\n")
        cfg = make_cfg(tmp, tiny, train=str(f)) if case == "non_utf8_train_file" else make_cfg(tmp, tiny, val=str(f))
        return cfg, f"{f}:2: not UTF-8 text (byte 20 of the line: invalid start byte); re-save the file as UTF-8"
    if case == "empty_validation_file":
        bad = _jsonl(f, [])
        return make_cfg(tmp, tiny, val=bad), f"prompt_learning.model.data.validation_ds: {bad} has no records"
    if case == "template_field_missing_in_record":
        rec = {k: v for k, v in RECS[1].items() if k != "question"}
        bad = _jsonl(f, [RECS[0], rec])
        return make_cfg(tmp, tiny, train=bad), (f"{bad}:2: record has no field 'question' required by the template of task "
                                                f"'squad'; add it or fix the template")
    if case == "new_task_without_training_records":
        sent = {**SQUAD_T, "taskname": "sent"}
        cfg = make_cfg(tmp, tiny, templates=(SQUAD_T, sent), new_tasks=("squad", "sent"))
        OmegaConf.update(cfg, "model.prompt_tuning.new_prompt_init_methods", ["random"], merge=False)
        return cfg, ("prompt_learning.model.data.train_ds: no training examples of the new task 'sent' (examples per task: "
                     "{'squad': 24}); add records with taskname 'sent' or remove it from prompt_learning.model.new_tasks")
    if case in ("truncated_restore_artifact", "restore_path_is_a_file"):
        art = _artifact_of_another_model(tmp)
        tables = art / "prompts.safetensors"
        tables.write_bytes(tables.read_bytes()[:40])
        sent = {**SQUAD_T, "taskname": "sent"}
        cfg = make_cfg(tmp, tiny, templates=(SQUAD_T, sent), new_tasks=("sent",),
                       train=_jsonl(f, [{**r, "taskname": "sent"} for r in RECS]))
        OmegaConf.update(cfg, "model.existing_tasks", ["squad"], merge=False)
        if case == "restore_path_is_a_file":
            OmegaConf.update(cfg, "model.restore_path", str(tables), merge=False)
            return cfg, f"prompt_learning.model.restore_path: '{tables}' is a file, not a folder; name the folder"
        OmegaConf.update(cfg, "model.restore_path", str(art), merge=False)
        return cfg, (f"prompt_learning.model.restore_path={art}: {tables} is truncated or not a safetensors file "
                     f"(SafetensorError: ")
    if case == "train_ds_is_a_folder":
        return make_cfg(tmp, tiny, train=str(tmp)), (f"prompt_learning.model.data.train_ds: '{tmp}' is a folder, not a file; "
                                                     f"name the file itself")
    if case == "init_file_truncated":
        init = tmp / "init.npy"
        init.write_bytes(b"\x93NUMPY\x01\x00")
        cfg = make_cfg(tmp, tiny)
        OmegaConf.update(cfg, "model.prompt_tuning.new_prompt_init_methods", ["file"], merge=False)
        OmegaConf.update(cfg, "model.prompt_tuning.new_prompt_init_file", [str(init)], merge=False)
        return cfg, f"prompt_learning.model.prompt_tuning.new_prompt_init_file: {init} is truncated or not a .npy file ("
    if case == "unknown_key_in_hand_edited_config":
        cfg = make_cfg(tmp, tiny)
        OmegaConf.update(cfg, "trainer.max_step", 5, force_add=True)
        return cfg, "prompt_learning.trainer.max_step: unknown key (nothing reads it); did you mean prompt_learning.trainer.max_steps?"
    raise AssertionError(case)


STAGE_CASES = ["malformed_jsonl_line", "empty_answer", "answer_list_empty", "no_room_for_context_after_truncation",
               "unknown_taskname", "wrong_type_in_record", "empty_train_file", "model_config_json_corrupt",
               "model_weights_truncated", "model_without_tokenizer", "incompatible_artifact", "corrupt_checkpoint",
               "checkpoint_of_another_config", "non_utf8_train_file", "non_utf8_validation_file", "empty_validation_file",
               "template_field_missing_in_record", "new_task_without_training_records", "truncated_restore_artifact",
               "restore_path_is_a_file", "train_ds_is_a_folder", "init_file_truncated", "unknown_key_in_hand_edited_config"]


@pytest.mark.parametrize("case", STAGE_CASES)
def test_stage_bad_input(tmp_path, tiny, capsys, case):
    from stages.prompt_learning.train import train

    (tmp_path / "case").mkdir()
    cfg, needle = _stage_case(case, tmp_path / "case", tiny)
    config = tmp_path / "stage.yaml"
    OmegaConf.save(cfg, config)
    capsys.readouterr()
    assert run_stage(train, ["--config", str(config)]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err + out
    log_dir = Path(cfg.exp_manager.explicit_log_dir)
    assert not Path(cfg.model.artifact_path).exists(), "no artifact for a failed run"
    assert not (log_dir / "prompt_learning_summary.json").exists() and not (log_dir / "loss_curve.png").exists()
    if case != "checkpoint_of_another_config":   # (its checkpoint folder comes from the earlier, valid run)
        written = sorted(p.name for p in (log_dir / "checkpoints").glob("*")) if (log_dir / "checkpoints").exists() else []
        assert written in ([], ["last.ckpt", "last.prev.ckpt"]), f"no checkpoint may be written: {written}"


def test_evaluation_with_a_damaged_artifact(tmp_path, capsys):
    """The evaluation stage entry: an artifact folder that lost its tables (an interrupted copy)."""
    from stages.evaluation.evaluate import evaluate
    from tests.support.evaluation import SQUAD_RECORDS, make_cfg as eval_cfg, write_jsonl

    art = tmp_path / "prompt_artifact"
    art.mkdir()
    (art / "artifact.json").write_text("{}")
    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    cfg = eval_cfg(tmp_path, test_ds, art)
    OmegaConf.update(cfg, "model.language_model_path", str(tmp_path / "unused"), merge=False)
    config = tmp_path / "eval.yaml"
    OmegaConf.save(cfg, config)
    assert run_stage(evaluate, ["--config", str(config)]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"evaluation.model.artifact_path={art}: not a prompt artifact" in errors[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "results" / "metrics.json").exists()


def test_the_suite_has_at_least_60_cases():
    assert len(LAUNCHER_CASES) == 17   # run by tests/launcher/test_launcher.py::test_bad_inputs_give_one_line_and_write_nothing
    total = len(LAUNCHER_CASES) + len(PRELAUNCH) + len(STAGE_CASES) + 1 + 2 + 2   # + the evaluation cases, the two disk-full cases
    assert total >= 60, total


# ---- a full disk: the launcher's writes (a real full tmpfs, as root) and the stage's (a write that fails) ----------
def _tiny_full_tmpfs(folder: Path) -> bool:
    """Mount a 64 KiB tmpfs at ``folder`` and fill it; False where this process may not mount."""
    import os
    import subprocess

    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        return False
    try:
        with open(folder / "filler", "wb") as fh:
            fh.write(b"x" * (1 << 20))
    except OSError:
        pass
    return True


def test_launcher_disk_full(tmp_path):
    import subprocess

    full = tmp_path / "full"
    if not _tiny_full_tmpfs(full):
        pytest.skip("needs root to mount a tmpfs")
    try:
        results = full / "results"
        out = run_main([f"base_results_dir={results}", f"data_dir={tmp_path}/data", "dry_run=true", "stages=[data_preparation]"])
        assert out.returncode == 2, (out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        hydra_yaml = re.escape(str(results / "data_preparation" / "download_squad_hydra-")) + r"[0-9a-f]+\.yaml"
        assert len(lines) == 1 and re.fullmatch(
            rf"error: {hydra_yaml}: no space left on the device \([\d,]+ bytes to write, 0 bytes free "
            rf"there\); free some space or write to another folder", lines[0]), out.stderr
        assert not results.exists(), "the launcher removes the folders it created"
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_stage_disk_full(tmp_path, tiny, capsys, monkeypatch):
    """The first file the stage writes (checkpoint, log or artifact) fails with ENOSPC: one line naming it."""
    import errno
    import os

    from stages.prompt_learning.train import train

    cfg = make_cfg(tmp_path / "case", tiny, max_steps=2)
    config = tmp_path / "stage.yaml"
    OmegaConf.save(cfg, config)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    assert run_stage(train, ["--config", str(config)]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    log_dir = Path(cfg.exp_manager.explicit_log_dir)
    assert len(errors) == 1 and re.fullmatch(rf"error: {re.escape(str(log_dir))}/\S+: no space left on the device "
                                             rf"\([\d,]+ bytes free there\); free some space or write to another folder",
                                             errors[0]), err
    assert "Traceback" not in err + out
    assert not Path(cfg.model.artifact_path).exists() and not (log_dir / "prompt_learning_summary.json").exists()
    assert not list(log_dir.rglob(".*.tmp")), "no temporary file is left behind"


# ---- evaluation: the test file and the artifact's tables ------------------------------------------------------------
@pytest.mark.parametrize("case", ["non_utf8_test_file", "truncated_artifact_tables"])
def test_evaluation_bad_input(tmp_path, capsys, case):
    from stages.evaluation.evaluate import evaluate
    from tests.support.evaluation import SQUAD_RECORDS, make_cfg as eval_cfg, write_jsonl

    test_ds = write_jsonl(tmp_path / "test.jsonl", SQUAD_RECORDS)
    art = _artifact_of_another_model(tmp_path)
    if case == "non_utf8_test_file":
        test_ds.write_bytes(test_ds.read_bytes() + b"{\"question\": \"caf\xe9\"}\n")
        needle = f"{test_ds}:{len(SQUAD_RECORDS) + 1}: not UTF-8 text (byte 17 of the line: invalid continuation byte); re-save the file as UTF-8"
    else:
        tables = art / "prompts.safetensors"
        tables.write_bytes(tables.read_bytes()[:40])
        needle = f"evaluation.model.artifact_path={art}: {tables} is truncated or not a safetensors file (SafetensorError: "
    cfg = eval_cfg(tmp_path, test_ds, art)
    config = tmp_path / "eval.yaml"
    OmegaConf.save(cfg, config)
    assert run_stage(evaluate, ["--config", str(config)]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "results" / "metrics.json").exists()
