"""trainer.reuse_host_memory (stages/engine/host_memory.py): freed host memory is reused, page faults disappear, the knob
is checked and reaches both stages. The malloc setting is process-wide, so the behaviour tests run in a child."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from stages.common.errors import UserError
from tests.support.paths import ROOT

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not sys.platform.startswith("linux"),
                           reason="the setting is a glibc malloc option")

# A training step in miniature: five tensors of 12-48 MB (above glibc's largest mmap threshold, like the attention
# scores of a batch) allocated, filled and freed, eight times; the minor page faults of the last four steps count.
# (One size alone is a bad model: glibc's aligned allocation of a single repeated size creeps through the heap.)
CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from stages.engine.host_memory import in_effect, reuse_host_memory
    applied = reuse_host_memory(sys.argv[1] == "on")
    import ctypes
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    def top_step():   # 48 MB malloc'ed, written and freed at the top of the heap
        p = libc.malloc(48 * 2**20)
        ctypes.memset(p, 1, 48 * 2**20)
        libc.free(p)
    top_step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        top_step()
    top_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    def step():
        xs = [torch.empty(n).fill_(1.0) for n in (12 * 2**20, 8 * 2**20, 3 * 2**20, 8 * 2**20, 12 * 2**20)]
        del xs
    for _ in range(4):
        step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(json.dumps({"applied": applied, "in_effect": in_effect(), "faults": faults, "top_faults": top_faults}))
""")


def _child(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc
def test_reuse_removes_the_page_faults_of_a_big_allocation_cycle():
    off, on = _child("off"), _child("on")
    pages = 4 * (12 + 8 + 3 + 8 + 12) * 2**22 // 4096   # 4 steps of 172 MB: 44,032 pages each
    assert not off["applied"] and not off["in_effect"]
    assert off["faults"] > pages // 2          # glibc as it comes: fresh pages every step
    assert on["applied"] and on["in_effect"]
    assert on["faults"] < pages // 20          # reused: at most a stray block (glibc may still place one anew)
    # glibc adapts its trim threshold to the mmap threshold on its own, but not once mallopt has set either: without
    # the trim setting, 48 MB freed at the heap top would go back to the kernel every step
    assert on["top_faults"] < 4 * 48 * 2**20 // 4096 // 100


def test_stays_off_where_not_glibc(monkeypatch):
    from stages.engine import host_memory

    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert host_memory._mallopt() is None
    assert host_memory.reuse_host_memory(True) is False


def test_every_stage_config_turns_it_on():
    for path in ["conf/prompt_learning/gpt/squad.yaml", "conf/evaluation/gpt/squad.yaml",
                 "conf/evaluation/t5/squad.yaml", "conf/evaluation/mt5/squad.yaml"]:
        assert OmegaConf.load(ROOT / path).trainer.reuse_host_memory is True, path


def test_training_stage_rejects_a_non_boolean_before_any_work(tmp_path, monkeypatch):
    from stages.prompt_learning import train as T

    called = []
    monkeypatch.setattr(T, "reuse_host_memory", lambda *a: called.append(a))
    cfg = OmegaConf.create({"trainer": {"reuse_host_memory": "yes"}, "model": {}})
    with pytest.raises(UserError, match=r"^prompt_learning\.trainer\.reuse_host_memory: must be true or false, got 'yes'$"):
        T.train(cfg)
    assert called == []


def test_training_stage_applies_the_knob(tmp_path, monkeypatch):
    from stages.prompt_learning import train as T
    from tests.support.tiny_models import make_model_dir
    from tests.support.training import make_cfg

    called = []
    monkeypatch.setattr(T, "reuse_host_memory", lambda *a: called.append(a[0]))
    monkeypatch.setattr(T.PromptLearningRecipe, "read_records", lambda self: (_ for _ in ()).throw(RuntimeError("stop")))
    model = make_model_dir(tmp_path / "model")
    for value in (True, False):
        cfg = make_cfg(tmp_path / str(value), str(model))
        cfg.trainer.reuse_host_memory = value
        with pytest.raises(RuntimeError, match="stop"):   # stops right after the process setup, before any data
            T.train(cfg)
    assert called == [True, False]
