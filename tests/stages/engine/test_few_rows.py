"""Few-row linear layers (stages/engine/few_rows.py): the same outputs as nn.Linear, only for passes of
few rows, only while the block is open, and used by generation."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from stages.engine import few_rows as FR  # noqa: E402
from stages.engine.family import DecoderOnlyFamily  # noqa: E402
from tests.support.engine import prompted, squad_rows  # noqa: E402
from tests.support.records import paragraph_records  # noqa: E402
from tests.support.templates import SQUAD_T  # noqa: E402


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 3, 48), (4, 8, 48), (3, 11, 48), (0, 48)])
def test_same_outputs_as_linear(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with FR.few_row_linears(lin, max_rows=32) as n:
        got = lin(x)
    assert n == 1
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_few_rows_take_the_other_kernel_and_the_switch_is_undone(monkeypatch):
    lin = nn.Linear(16, 8, bias=False)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(FR.torch, "mm", lambda a, b: calls.append(tuple(a.shape)) or real_mm(a, b))
    with FR.few_row_linears(nn.Sequential(lin), max_rows=4):
        lin(torch.randn(2, 2, 16))          # 4 rows: weight @ x^T
        lin(torch.randn(5, 16))             # 5 rows: nn.Linear's kernel
    assert calls == [(8, 16)]
    assert "forward" not in lin.__dict__    # back to nn.Linear.forward
    with pytest.raises(RuntimeError), FR.few_row_linears(lin):
        raise RuntimeError("boom")
    assert "forward" not in lin.__dict__    # undone on errors too


def test_other_layers_are_left_alone():
    class Custom(nn.Linear):
        pass

    half = nn.Linear(4, 4).to(torch.float64)
    own = nn.Linear(4, 4)
    own.forward = lambda x: x           # a forward of its own (e.g. another patch)
    model = nn.Sequential(nn.Linear(4, 4), Custom(4, 4), half, own)
    with FR.few_row_linears(model) as n:
        assert n == 1
        assert own(torch.ones(1, 4)).eq(1).all()
    assert own.forward(torch.zeros(1)) == 0


def test_generation_uses_it_and_answers_are_unchanged(tiny, monkeypatch):  # noqa: F811
    """Decoder-only generation runs its passes through few_row_linears; the tokens equal those of a run with
    nn.Linear's kernel everywhere."""
    pm = prompted(tiny, [SQUAD_T])
    rows, prefix_lens = squad_rows(pm, paragraph_records(2, 3, seed=3))
    fam = DecoderOnlyFamily()
    common = dict(pad_id=pm.tok.pad_id, eos_ids=set(), tokens_to_generate=10, is_done=lambda i, g: False,
                  prefix_lens=prefix_lens, prompt_lookup_num_tokens=3)
    used = []
    real = FR.linear_few_rows
    monkeypatch.setattr(FR, "linear_few_rows", lambda m, k, x: used.append(x.numel() // x.shape[-1]) or real(m, k, x))
    with_kernel = fam.generate(pm.model, pm.store, rows, **common)
    assert used and min(used) <= FR.MAX_ROWS
    monkeypatch.setattr("stages.engine.family.gpt.few_row_linears", lambda model: FR.few_row_linears(model, max_rows=0))
    assert fam.generate(pm.model, pm.store, rows, **common) == with_kernel
