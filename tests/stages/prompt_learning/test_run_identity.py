"""The run identity (``stages/prompt_learning/identity.py``): a resume continues only the run that wrote the
checkpoint. A changed setting is refused with the keys that changed; "train longer" (max_steps) continues;
``exp_manager.resume_ignore_changes`` lets a listed change through; ``resume_if_exists=false`` sets the old
outputs aside. Real training on the tiny Llama, in-process."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_lightning")

from omegaconf import OmegaConf  # noqa: E402

from stages.common.errors import UserError  # noqa: E402
from tests.support.tiny_models import make_model_dir  # noqa: E402
from tests.support.training import make_cfg, tables, train  # noqa: E402


def constant_cfg(tmp: Path, tiny: str, max_steps: int):
    """A constant learning rate: then how far the run goes does not change the steps it takes on the way."""
    cfg = make_cfg(tmp, tiny, max_steps=max_steps)
    OmegaConf.update(cfg, "model.optim.sched.name", "constant", merge=False)
    return cfg


def meta(cfg) -> dict:
    return json.loads((Path(cfg.model.artifact_path) / "artifact.json").read_text())


def last_ckpt(cfg) -> Path:
    return Path(cfg.exp_manager.explicit_log_dir) / "checkpoints" / "last.ckpt"


def test_a_resume_after_changing_the_learning_rate_is_refused_with_the_key(tmp_path, tiny):
    cfg = make_cfg(tmp_path, tiny, max_steps=2)
    train(cfg)
    before = last_ckpt(cfg).read_bytes()
    cfg.model.optim.lr = 0.03
    cfg.trainer.max_steps = 4                                   # not part of the identity: not listed
    with pytest.raises(UserError) as err:
        train(cfg)
    assert str(err.value) == (
        f"{last_ckpt(cfg)}: checkpoint was written by a run with other settings (prompt_learning.model.optim.lr); "
        "choose a new prompt_learning.run.name (a new folder), start over with "
        "prompt_learning.exp_manager.resume_if_exists=false (the previous outputs are moved aside), or continue it "
        "anyway with prompt_learning.exp_manager.resume_ignore_changes=[model.optim.lr]")
    assert last_ckpt(cfg).read_bytes() == before and meta(cfg)["training"]["lr"] == 0.05   # nothing rewritten


def test_training_longer_is_one_override_and_reaches_the_uninterrupted_prompt(tmp_path, tiny):
    straight = constant_cfg(tmp_path / "straight", tiny, max_steps=4)
    train(straight)
    longer = constant_cfg(tmp_path / "longer", tiny, max_steps=2)
    train(longer)
    longer.trainer.max_steps = 4
    summary = train(longer)
    assert summary["steps"] == 4
    assert torch.equal(tables(straight.model.artifact_path)["prompt_table.squad"],
                       tables(longer.model.artifact_path)["prompt_table.squad"])
    assert meta(longer)["training"]["identity_digest"] == meta(straight)["training"]["identity_digest"]


def test_resume_ignore_changes_lets_a_listed_change_through_and_records_it(tmp_path, tiny):
    cfg = constant_cfg(tmp_path, tiny, max_steps=2)
    train(cfg)
    cfg.model.optim.lr = 0.02
    cfg.trainer.max_steps = 3
    OmegaConf.update(cfg, "exp_manager.resume_ignore_changes", ["model.optim"], merge=False)   # a whole subtree
    assert train(cfg)["steps"] == 3
    training = meta(cfg)["training"]
    assert training["lr"] == 0.02 and training["resumed_with_changes"] == ["prompt_learning.model.optim.lr"]
    assert training["identity"]["prompt_learning.model.optim.lr"] == 0.02


def test_another_base_model_of_the_same_shape_is_refused(tmp_path, tiny):
    cfg = make_cfg(tmp_path, tiny, max_steps=2)
    train(cfg)
    other = make_model_dir(tmp_path / "other", seed=1)          # same architecture and sizes, other weights
    cfg.model.language_model_path = str(other)
    with pytest.raises(UserError, match=r"other settings \(prompt_learning\.model\.language_model_path \(content\)\)"):
        train(cfg)


def test_a_data_file_edited_in_place_is_another_run(tmp_path, tiny):
    cfg = make_cfg(tmp_path, tiny, max_steps=2)
    train(cfg)
    identity = meta(cfg)["training"]["identity"]
    train_file = Path(cfg.model.data.train_ds[0])
    data = train_file.read_bytes()
    assert identity["prompt_learning.model.data.train_ds (content)"] == [
        {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    assert "prompt_learning.model.artifact_path" not in identity and "prompt_learning.trainer.max_steps" not in identity
    train_file.write_bytes(data.replace(b"Paris", b"Lyon", 1))  # same name, same record count, other content
    cfg.trainer.max_steps = 3
    with pytest.raises(UserError, match=r"other settings \(prompt_learning\.model\.data\.train_ds \(content\)\)"):
        train(cfg)


def test_an_unknown_ignore_list_is_refused_before_any_work(tmp_path, tiny):
    cfg = make_cfg(tmp_path, tiny, max_steps=2)
    OmegaConf.update(cfg, "exp_manager.resume_ignore_changes", [3], merge=False)
    with pytest.raises(UserError, match=r"^prompt_learning\.exp_manager\.resume_ignore_changes: expected a list of key "
                                        r"paths such as \[model\.optim\.lr\], got \[3\]$"):
        train(cfg)
    assert not (tmp_path / "results").exists()


def test_starting_over_sets_the_previous_outputs_aside(tmp_path, tiny):
    cfg = make_cfg(tmp_path, tiny, max_steps=2)
    train(cfg)
    first = tables(cfg.model.artifact_path)["prompt_table.squad"]
    cfg.model.optim.lr = 0.01
    cfg.exp_manager.resume_if_exists = False
    train(cfg)
    (previous,) = (tmp_path / "results" / "previous").iterdir()
    old_log = previous / "log"                                  # make_cfg keeps the artifact beside the log folder
    assert torch.equal(tables(str(previous / "artifact"))["prompt_table.squad"], first)
    assert (old_log / "checkpoints" / "last.ckpt").is_file() and (old_log / "prompt_learning_summary.json").is_file()
    assert meta(cfg)["training"]["lr"] == 0.01                  # the new run's outputs, nothing of the old mixed in
    assert json.loads((Path(cfg.exp_manager.explicit_log_dir) / "loss_history.json").read_text())["train"][0][0] == 1


def test_auto_precision_resolved_otherwise_on_resume_is_refused(tmp_path, tiny, monkeypatch):
    """``trainer.precision=auto`` is decided on the machine that runs the job: a resume where it resolves to another
    precision (bf16-true where the run began, 32 here) would silently continue in it, so the resolved precision is
    part of the identity (faked capability: the same on every CI machine)."""
    from stages.common import precision as P

    cfg = make_cfg(tmp_path, tiny, max_steps=2)
    cfg.trainer.precision = "auto"
    monkeypatch.setattr(P, "bf16_support", lambda accelerator: P.Bf16Support("cpu", True, "faked", 100.0, 200.0))
    train(cfg)
    assert meta(cfg)["training"]["identity"]["prompt_learning.trainer.precision (derived)"] == "bf16-true"
    monkeypatch.setattr(P, "bf16_support", lambda accelerator: P.Bf16Support("cpu", False, "faked", 100.0, 1.0))
    cfg.trainer.max_steps = 4
    with pytest.raises(UserError) as err:
        train(cfg)
    assert "other settings (prompt_learning.trainer.precision (derived))" in str(err.value)
    assert str(err.value).endswith("prompt_learning.exp_manager.resume_ignore_changes=[trainer.precision]")
