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
import shutil
from pathlib import Path

import pytest

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
]


@pytest.mark.parametrize("args,needle", PRELAUNCH, ids=[" ".join(a) for a, _ in PRELAUNCH])
def test_prelaunch_bad_input(tmp_path, args, needle):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "weights.bin").write_bytes(b"x")
    results = tmp_path / "results"
    out = run_main([f"base_results_dir={results}", f"data_dir={tmp_path}/data", *(a.format(tmp=tmp_path) for a in args)])
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
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
    raise AssertionError(case)


STAGE_CASES = ["malformed_jsonl_line", "empty_answer", "answer_list_empty", "no_room_for_context_after_truncation",
               "unknown_taskname", "wrong_type_in_record", "empty_train_file", "model_config_json_corrupt",
               "model_weights_truncated", "model_without_tokenizer", "incompatible_artifact", "corrupt_checkpoint",
               "checkpoint_of_another_config"]


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


def test_the_suite_has_at_least_25_cases():
    assert len(LAUNCHER_CASES) == 17   # run by tests/launcher/test_launcher.py::test_bad_inputs_give_one_line_and_write_nothing
    total = len(LAUNCHER_CASES) + len(PRELAUNCH) + len(STAGE_CASES) + 1   # + the evaluation case
    assert total >= 25, total
