"""Model-family adapters: the seam between the engine and one kind of Hugging Face model.

An adapter says how examples and prompts are built, how the training loss is computed and how greedy generation
runs: ``gpt.py`` ("gpt") for causal LMs (Llama, GPT-2, ...), ``t5.py`` ("t5") for T5/mT5 via AutoModelForSeq2SeqLM
(virtual rows in the encoder input, the answer as decoder labels). ``family_for`` picks one from the model config;
the trainer, ``PromptedModel`` and the evaluation stage never branch on the family.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from .gpt import DecoderOnlyFamily
from .t5 import EncoderDecoderFamily


class Family(Protocol):
    """What the engine asks of a model family (both adapters implement it)."""

    name: str
    auto_class: str
    shares_prefix: bool
    prompt_lookup: bool

    def build_example(self, template: Any, record: dict[str, Any], info: Any, **kw: Any) -> Any: ...
    def build_prompt(self, template: Any, record: dict[str, Any], info: Any, **kw: Any) -> tuple[list[int], list[int]]: ...
    def collate(self, examples: Sequence[Any], task_ids: dict[str, int], pad_id: int) -> dict[str, Any]: ...
    def embed(self, model: Any, store: Any, input_ids: Any, virtual_index: Any, task_ids: Any) -> Any: ...
    def loss(self, model: Any, store: Any, batch: dict[str, Any]) -> tuple[Any, Any]: ...
    def generate(self, model: Any, store: Any, rows: Sequence[tuple[list[int], list[int], int]], *, pad_id: int,
                 eos_ids: set[int], tokens_to_generate: int, is_done: Callable[[int, list[int]], bool], **kw: Any) -> list[list[int]]: ...


def family_for(model_config: Any, tokenizer: Any = None) -> Family:
    """The adapter for a loaded model: encoder-decoder configs (T5/mT5) -> "t5", everything else -> "gpt".

    ``tokenizer`` lets the encoder-decoder adapter look up its sentinel ids (UserError if there are none)."""
    if getattr(model_config, "is_encoder_decoder", False):
        return EncoderDecoderFamily(tokenizer)
    return DecoderOnlyFamily()


__all__ = ["DecoderOnlyFamily", "EncoderDecoderFamily", "Family", "family_for"]
