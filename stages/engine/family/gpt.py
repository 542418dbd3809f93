"""The decoder-only family ("gpt"): causal LMs (Llama, GPT-2, ...) with virtual rows in the input, loss on the
answer tokens, greedy generation with shared prefixes and prompt lookup.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from stages.engine.template import TaskTemplate

from .. import collate as C
from .. import examples as D
from .. import shared_prefix as SP
from ..decoding import greedy_decode
from ..few_rows import few_row_linears
from ..prompts import PromptStore, embed_inputs


class DecoderOnlyFamily:
    name = "gpt"
    auto_class = "AutoModelForCausalLM"
    shares_prefix = True    # shared-context prefixes (shared_prefix.py): training batches and generation
    prompt_lookup = True    # generate() takes prompt_lookup_num_tokens / stats (decoding.greedy_decode)

    # ---- examples -------------------------------------------------------------------------------
    def build_example(self, template: TaskTemplate, record: dict[str, Any], info: D.TokenizerInfo, **kw: Any) -> D.Example | None:
        return D.build_example(template, record, info, **kw)

    def build_prompt(self, template: TaskTemplate, record: dict[str, Any], info: D.TokenizerInfo, **kw: Any) -> tuple[list[int], list[int]]:
        return D.build_prompt(template, record, info, **kw)

    @staticmethod
    def collate(examples: Sequence[D.Example], task_ids: dict[str, int], pad_id: int) -> dict[str, Any]:
        return C.collate(examples, task_ids, pad_id)

    # ---- training -------------------------------------------------------------------------------
    embed = staticmethod(embed_inputs)

    def loss(self, model: Any, store: PromptStore, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token cross-entropies, number of label tokens); logits only where there are labels.

        Accepts a plain ``collate.collate`` batch or a ``collate.collate_shared`` one (each distinct prefix run once;
        same loss and prompt gradient up to float rounding, see shared_prefix.py)."""
        if SP.is_shared(batch):
            return SP.shared_loss(self, model, store, batch)
        x = self.embed(model, store, batch["input_ids"], batch["virtual_index"], batch["task_ids"])
        mask = batch["attention_mask"]
        labels = batch["labels"][:, 1:]
        sel = labels != D.IGNORE
        body = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if body is not None and body is not model and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
            hidden = body(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
            logits = model.get_output_embeddings()(hidden[:, :-1][sel])
        else:  # generic path: full logits
            logits = model(inputs_embeds=x, attention_mask=mask, use_cache=False).logits[:, :-1][sel]
        target = labels[sel]
        total = F.cross_entropy(logits.float(), target, reduction="sum")
        return total, sel.sum()

    # ---- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model: Any, store: PromptStore | None, rows: Sequence[tuple[list[int], list[int], int]], *,
                 pad_id: int, eos_ids: set[int], tokens_to_generate: int,
                 is_done: Callable[[int, list[int]], bool], prefix_lens: Sequence[int] | None = None,
                 prompt_lookup_num_tokens: int = 0, pass_budget: int | None = None,
                 stats: dict[str, int] | None = None) -> list[list[int]]:
        """Greedy decoding with the KV cache for one left-padded batch.

        rows: (input_ids, virtual_index, task_id). Pads come first, then [virtual + text] in template order;
        position ids are computed from the attention mask, so padding does not shift positions and a
        padded row decodes exactly as it would alone. ``is_done(i, generated)`` implements stop strings.
        ``prefix_lens`` (from ``examples.build_prompt_split``): prefill each distinct prefix once and reuse its cache
        for every row that starts with it (``shared_prefix.prefill_shared``). Decoding (``decoding.greedy_decode``)
        drops finished rows from the batch and, with ``prompt_lookup_num_tokens`` > 0, verifies up to that many tokens
        copied from the row's prompt per pass; the answers are the plain greedy ones. Passes of few rows run their
        linear layers through ``few_rows.few_row_linears`` (same products, a faster CPU kernel).
        """
        with few_row_linears(model):   # decoding passes feed few rows: a faster CPU kernel (few_rows.py)
            if prefix_lens is not None:
                out, mask, pos = SP.prefill_shared(self, model, store, list(rows), list(prefix_lens), pad_id)
            else:
                out, mask, pos = self._prefill(model, store, rows, pad_id)
            sources = [[-1 if v >= 0 else t for t, v in zip(ids, vidx)] for ids, vidx, _ in rows]
            return greedy_decode(model, out, mask, pos, sources, eos_ids=eos_ids, tokens_to_generate=tokens_to_generate,
                                 is_done=is_done, prompt_lookup_num_tokens=prompt_lookup_num_tokens,
                                 pass_budget=pass_budget, stats=stats)

    def _prefill(self, model: Any, store: PromptStore | None, rows: Sequence[tuple[list[int], list[int], int]],
                 pad_id: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Plain prefill of the whole left-padded prompts: (output of the last position, mask, position ids)."""
        device = next(model.parameters()).device
        exs = [D.Example("", ids, vidx, [D.IGNORE] * len(ids)) for ids, vidx, _ in rows]
        batch = C.collate(exs, {"": 0}, pad_id, left=True)
        ids = batch["input_ids"].to(device)
        vidx = batch["virtual_index"].to(device)
        mask = batch["attention_mask"].to(device)
        task_ids = torch.tensor([t for _, _, t in rows], dtype=torch.long, device=device)
        x = self.embed(model, store, ids, vidx, task_ids)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
        return out, mask, pos
