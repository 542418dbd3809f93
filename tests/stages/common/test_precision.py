"""``trainer.precision`` follows the machine (``stages/common/precision.py``): ``auto`` takes bf16 only where the
device computes it natively, an explicit bf16 where it would be emulated is one line with the measured rates.
The capability is faked with ``PROMPTLAUNCH_BF16`` (the override a node with a misreporting torch build uses);
the probe's rates are real."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")

from stages.common import precision  # noqa: E402
from stages.common.errors import UserError  # noqa: E402
from tests.support.launcher import run_main  # noqa: E402


@pytest.fixture
def fake(monkeypatch):
    def set_to(value: str) -> None:
        monkeypatch.setenv("PROMPTLAUNCH_BF16", value)
        precision.bf16_support.cache_clear()

    yield set_to
    precision.bf16_support.cache_clear()


def test_without_native_bf16_auto_is_fp32_and_bf16_is_refused(fake):
    fake("emulated")
    assert precision.resolve("auto", "cpu", "k") == "32"
    for asked in ("bf16-mixed", "bf16-true", "bf16"):
        with pytest.raises(UserError) as err:
            precision.resolve(asked, "cpu", "prompt_learning.trainer.precision")
        line = str(err.value)
        assert "\n" not in line and line.startswith("prompt_learning.trainer.precision: ")
        assert "would be emulated on this machine (PROMPTLAUNCH_BF16=emulated" in line
        assert re.search(r"measured \d+ GFLOP/s bf16 vs \d+ fp32", line)
        assert line.endswith("set prompt_learning.trainer.precision=32 or auto")
    assert precision.resolve("32", "cpu", "k") == "32"   # no probe needed, nothing refused


def test_with_native_bf16_auto_takes_bf16_true_when_the_probe_agrees(fake):
    fake("native")
    support = precision.bf16_support("cpu")
    expected = "bf16-true" if support.bf16_gflops > support.fp32_gflops else "32"
    assert precision.resolve("auto", "cpu", "k") == expected
    assert precision.resolve("bf16", "cpu", "k") == "bf16-mixed"      # Lightning's alias, one spelling here
    assert precision.resolve("bf16-true", "cpu", "k") == "bf16-true"
    slow = precision.Bf16Support("cpu", True, "faked", fp32_gflops=100.0, bf16_gflops=50.0)
    assert precision.decide("auto", slow, "k") == "32"                # native but slower here: fp32
    assert precision.decide("bf16-mixed", slow, "k") == "bf16-mixed"  # asked for, and not emulated: allowed
    assert slow.describe() == "cpu: bf16 native (faked); measured 50 GFLOP/s bf16 vs 100 fp32 (0.5x)"


def test_the_real_capability_is_what_torch_reports(monkeypatch):
    import torch

    monkeypatch.delenv("PROMPTLAUNCH_BF16", raising=False)
    precision.bf16_support.cache_clear()
    try:
        support = precision.bf16_support("cpu")
    finally:
        precision.bf16_support.cache_clear()
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert support.native == native and support.fp32_gflops > 0 and support.bf16_gflops > 0


@pytest.mark.parametrize("stage, args", [
    ("prompt_learning", ["stages=[prompt_learning]", "prompt_learning.trainer.precision=bf16-mixed"]),
    ("evaluation", ["stages=[evaluation]", "evaluation.trainer.precision=bf16-true"]),
])
def test_main_refuses_emulated_bf16_before_launch(tmp_path, stage, args):
    out = run_main([f"base_results_dir={tmp_path}/results", f"data_dir={tmp_path}/data", *args],
                   env={"PROMPTLAUNCH_BF16": "emulated"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {stage}.trainer.precision: ") and "would be emulated" in lines[0]
    assert not (tmp_path / "results").exists()


def test_sixteen_bit_stays_gpu_only():
    from stages.common.checks import check_trainer

    with pytest.raises(UserError, match=r"^s\.trainer\.precision: 16-mixed is not supported on CPU"):
        check_trainer({"trainer": {"accelerator": "cpu", "precision": "16-mixed"}}, "s")
    assert check_trainer({"trainer": {"accelerator": "cpu", "precision": "auto"}}, "s").precision == "auto"
