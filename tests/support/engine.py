"""Engine helpers on the tiny decoder-only models: a frozen model, a seeded prompt store, one loss/gradient pass, a
PromptedModel with random frozen prompts, and the prompt rows of SQuAD records."""
from __future__ import annotations

import torch

from stages.engine import examples as D
from stages.engine.family import DecoderOnlyFamily
from stages.engine.prompts import PromptStore
from stages.engine.template import parse_templates


def load_model(path: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_store(tasks: dict[str, int], hidden: int, seed: int = 0) -> PromptStore:
    store = PromptStore(list(tasks), hidden)
    g = torch.Generator().manual_seed(seed)
    for t, n in tasks.items():
        store.add_table(t, torch.randn(n, hidden, generator=g))
    return store


def loss_and_grad(model, store, batch) -> tuple[float, int, dict[str, torch.Tensor]]:
    store.zero_grad()
    total, n = DecoderOnlyFamily().loss(model, store, batch)
    total.backward()
    return float(total.detach()), int(n), {k: v.grad.clone() for k, v in store.tables.items()}


def assert_close_grads(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = float(a[k].abs().max())
        assert scale > 0, f"no gradient for {k}"
        assert float((a[k] - b[k]).abs().max()) <= rel * scale, k


def prompted(model_dir: str, templates: list[dict], seed: int = 0):
    from stages.engine.prompted_model import PromptedModel
    from stages.engine.base_model import load_model as load, load_tokenizer

    model = load(model_dir)
    tok = load_tokenizer(model_dir)
    tpls = parse_templates(templates)
    store = PromptStore(list(tpls), model.config.hidden_size)
    g = torch.Generator().manual_seed(seed)
    emb_std = float(model.get_input_embeddings().weight.std())
    for t, tpl in tpls.items():
        store.add_frozen(t, torch.randn(tpl.total_virtual_tokens, model.config.hidden_size, generator=g) * emb_std)
    return PromptedModel(model, tok, tpls, store.eval(), {})


def squad_rows(pm, recs, use_virtual=True):
    tpl = pm.templates["squad"]
    split = [D.build_prompt_split(tpl, r, pm.tok, where=f"r{i}", use_virtual=use_virtual) for i, r in enumerate(recs)]
    return [(ids, v, 0) for ids, v, _ in split], [p for *_, p in split]
