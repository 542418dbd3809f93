"""Reference answers from transformers' own greedy ``generate(inputs_embeds=...)``, one record at a time (no batching,
no padding, none of the engine's decoding), for prompts given as embeddings (``engine.prompt_embeds``)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from stages.engine.prompt_embeds import cut_answer


def transformers_answers(model: Any, tokenizer: Any, embeds: Sequence[torch.Tensor], tokens: int,
                         stop_strings: Sequence[str] = ("\n",)) -> list[str]:
    """Greedy answers of transformers' generate from each [tokens, hidden] prompt, cut as evaluation cuts them."""
    out = []
    for e in embeds:
        ids = model.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, e.shape[0], dtype=torch.long),
                             max_new_tokens=tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        out.append(cut_answer(tokenizer.decode(ids[0], skip_special_tokens=True), tuple(stop_strings)))
    return out
