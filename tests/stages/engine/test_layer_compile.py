"""trainer.compile (stages/engine/layer_compile.py) on the tiny random Llama: compiled decoder layers give
the eager loss and prompt gradient, one graph serves every layer and every padded length, passes with a KV cache
stay eager, a training run ends with the eager run's prompt, and bad settings fail in one line before any work."""
from __future__ import annotations

import logging
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from omegaconf import OmegaConf  # noqa: E402

from stages.common.errors import UserError  # noqa: E402
from stages.engine.template import parse_template  # noqa: E402
from stages.engine import collate as C  # noqa: E402
from stages.engine import examples as D  # noqa: E402
from stages.engine import layer_compile as LC  # noqa: E402
from tests.support.engine import assert_close_grads, load_model, loss_and_grad, make_store  # noqa: E402
from tests.support.records import paragraph_records  # noqa: E402
from tests.support.templates import SQUAD_T  # noqa: E402
from tests.support.training import make_cfg, tables, train  # noqa: E402


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_layers_equal_eager_one_graph_for_all_layers_and_lengths(tiny, info):
    torch._dynamo.reset()
    model = load_model(tiny, "eager")
    tpl = parse_template(SQUAD_T)
    exs = [D.build_example(tpl, r, info, max_seq_length=128, add_eos=True, where="r") for r in paragraph_records(4, 2)]
    ids = {"squad": 0}
    by_len = sorted(exs, key=lambda e: len(e.input_ids))
    short, long = C.collate(by_len[:3], ids, info.pad_id), C.collate(by_len[3:], ids, info.pad_id)
    assert short["input_ids"].shape[1] != long["input_ids"].shape[1]       # two padded lengths
    shared = C.collate_shared(exs, ids, info.pad_id)
    assert "prefix_row" in shared
    store = make_store({"squad": 4}, model.config.hidden_size)
    eager = {name: loss_and_grad(model, store, b) for name, b in (("short", short), ("long", long), ("shared", shared))}

    compiler = LC.LayerCompiler(model)
    assert compiler.enable() == model.config.num_hidden_layers
    before = graphs()
    for name, batch in (("short", short), ("long", long)):
        got = loss_and_grad(model, store, batch)
        assert got[1] == eager[name][1] and got[0] == pytest.approx(eager[name][0], rel=1e-5), name
        assert_close_grads(eager[name][2], got[2], rel=1e-4)
        # all layers and both lengths share one graph: compiled once, with dynamic shapes
        assert graphs() == before + 1, name
    got = loss_and_grad(model, store, shared)          # carries the prefix cache: the eager layers, nothing compiled
    assert graphs() == before + 1
    assert got[0] == eager["shared"][0] and all(torch.equal(got[2][k], eager["shared"][2][k]) for k in got[2])
    compiler.disable()
    assert all("forward" not in layer.__dict__ for layer in compiler.layers)


def test_model_without_repeated_layers_is_refused():
    with pytest.raises(UserError, match=r"^prompt_learning\.trainer\.compile: Linear names no repeated decoder layer"):
        LC.LayerCompiler(torch.nn.Linear(2, 2))


def test_setting_is_checked_and_needs_a_compiler_on_cpu(tmp_path, tiny, monkeypatch):
    from stages.prompt_learning.config import check_config

    cfg = make_cfg(tmp_path, tiny)
    cfg.trainer.compile = "fast"
    with pytest.raises(UserError, match=r"^prompt_learning\.trainer\.compile: must be true or false, got 'fast'$"):
        check_config(cfg)
    cfg.trainer.compile = True
    assert check_config(cfg).compile is True
    cfg.trainer.compile = False
    assert check_config(cfg).compile is False and not check_config(cfg).stage.here   # off: no compiler needed
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg.trainer.compile = True
    (here,) = check_config(cfg).stage.here                             # on CPU: the machine that runs it needs one
    with pytest.raises(UserError, match=r"^prompt_learning\.trainer\.compile: .*no C\+\+ compiler.*apt-get install g\+\+\) "
                                        r"or set prompt_learning\.trainer\.compile=false$"):
        here()


def test_training_stage_checks_the_setting_before_any_work(tmp_path, tiny, monkeypatch):
    cfg = make_cfg(tmp_path, tiny)
    cfg.trainer.compile = "yes"
    with pytest.raises(UserError, match=r"^prompt_learning\.trainer\.compile: must be true or false, got 'yes'$"):
        train(cfg)
    assert not (tmp_path / "results").exists()                       # failed before writing anything
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg.trainer.compile = True
    with pytest.raises(UserError, match=r"^prompt_learning\.trainer\.compile: .*no C\+\+ compiler"):
        train(cfg)
    monkeypatch.undo()
    cfg.trainer.devices = 2                                           # several processes: refused before the model loads
    cfg.model.global_batch_size = 8
    with pytest.raises(UserError, match=r"^prompt_learning\.trainer\.compile: runs in one process only, this run has 2"):
        train(cfg)


def test_compiled_training_ends_with_the_eager_prompt(tmp_path, tiny, caplog):
    runs = {}
    for on in (False, True):
        cfg = make_cfg(tmp_path / str(on), tiny, max_steps=4)
        cfg.trainer.compile = on
        with caplog.at_level(logging.INFO, logger="promptlaunch.prompt_learning"):
            runs[on] = (train(cfg), tables(cfg.model.artifact_path)["prompt_table.squad"])
    assert "decoder layers compiled with torch.compile" in caplog.text
    (eager, t_eager), (comp, t_comp) = runs[False], runs[True]
    assert comp["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-4)
    assert float((t_comp - t_eager).abs().max()) <= 1e-4 * float(t_eager.abs().max())


def test_shared_prefix_runs_warn_that_nothing_is_compiled(tmp_path, tiny, caplog):
    cfg = make_cfg(tmp_path, tiny, max_steps=1)
    cfg.trainer.compile = True
    cfg.model.data.share_prefix = True
    with caplog.at_level(logging.WARNING, logger="promptlaunch.prompt_learning"):
        train(cfg)
    assert "with prompt_learning.model.data.share_prefix=true every batch carries its prefix's KV cache" in caplog.text


def test_the_stage_config_documents_the_knob_off_by_default():
    from tests.support.paths import ROOT

    assert OmegaConf.load(ROOT / "conf/prompt_learning/gpt/squad.yaml").trainer.compile is False


def test_launcher_refuses_a_local_compiled_run_without_a_compiler(tmp_path):
    """Run here (cluster_type=local): no compiler on PATH is one line before anything is written; dry runs and Slurm jobs
    (whose nodes may have one) are left to the stage's own check."""
    import sys

    from tests.support.launcher import run_main

    bin_dir = tmp_path / "bin"                       # a PATH with python and nothing else
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": str(bin_dir), "CXX": ""}
    args = [f"base_results_dir={tmp_path}/results", f"data_dir={tmp_path}/data", "stages=[prompt_learning]",
            "prompt_learning.trainer.compile=true"]
    out = run_main(args, env=env)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: prompt_learning.trainer.compile: torch.compile on CPU builds C++ kernels, and this node has no C++ "
        "compiler (g++, c++, clang++ or $CXX); install one (apt-get install g++) or set prompt_learning.trainer.compile=false")
    assert not (tmp_path / "results").exists()
    assert run_main([*args, "dry_run=true"], env=env).returncode == 0


def test_cache_passes_are_recognised_under_every_keyword_transformers_used():
    """transformers 5.25 renamed the layer's ``past_key_values`` to ``cache``: both (and 4.x's name) stay eager."""
    for name in ("past_key_values", "cache", "past_key_value"):
        assert LC.carries_cache({name: object()}) and not LC.carries_cache({name: None})
    assert not LC.carries_cache({"attention_mask": object()})
