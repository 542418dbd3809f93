"""A tiny RANDOMLY INITIALISED Llama folder for trying tensor/pipeline parallelism on CPU (no hub download).

    python3 -m stages.prompt_learning.tiny_llama data/tiny_models/llama_tiny_random
    python3 main.py stages=[prompt_learning] prompt_learning.model.language_model_path=data/tiny_models/llama_tiny_random \\
        prompt_learning.model.tensor_model_parallel_size=2 prompt_learning.trainer.devices=2 \\
        prompt_learning.model.global_batch_size=8 prompt_learning.model.micro_batch_size=4

Why: the embedded SmolLM2-135M has 9 attention heads and 3 key/value heads, so tensor parallelism of 2 (or 4)
cannot split it. This folder is a ``LlamaForCausalLM`` with hidden 64, 4 attention heads, 2 key/value heads,
intermediate 128 and 4 decoder layers, so TP=2 and PP=2 (or 4) all fit, and a byte-level BPE tokenizer trained
deterministically on a few built-in sentences (byte fallback: it encodes any text, e.g. real SQuAD). The weights
are random (seeded), so answers are meaningless: it only exercises the parallel engine end to end. The folder says
so in ``README.txt`` and in ``config.json`` (``promptlaunch_note``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

LABEL = "RANDOMLY INITIALISED — for tests only"
CORPUS = [
    "Context: The capital of France is Paris. Question: What is the capital of France? Answer: Paris",
    "Context: Water boils at one hundred degrees. Question: When does water boil? Answer: one hundred degrees",
    "The Eiffel Tower was completed in 1889 in Paris, France. Gustave Eiffel's company designed and built the tower.",
    "Which state has its capital in the north? What is the population of the city? When was it founded?",
    "The quick brown fox jumps over the lazy dog. Sentiment: positive negative neutral Review: good bad",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"()-",
]
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def build_tokenizer(vocab_size: int = 400) -> Any:
    """Byte-level BPE trained on :data:`CORPUS` (deterministic), EOS ``<|endoftext|>``, pad ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>")


def build(folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write the tiny Llama + tokenizer into ``folder`` (atomically); returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.common.io import atomic_dir

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer()
        kw = dict(SIZES, vocab_size=len(tok), max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False, promptlaunch_note=LABEL)
        kw.update(overrides)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**kw))
        with torch.no_grad():   # a spikier output distribution: greedy decoding is less tie-prone
            model.lm_head.weight.mul_(10)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        mask = os.umask(0)
        os.umask(mask)
        for f in tmp.iterdir():   # safetensors writes 0600; a shared data folder needs the usual mode
            f.chmod(0o666 & ~mask)
        (tmp / "README.txt").write_text(
            f"{LABEL}\n\nA tiny Llama (hidden {kw['hidden_size']}, {kw['num_hidden_layers']} layers, "
            f"{kw['num_attention_heads']} heads, {kw['num_key_value_heads']} KV heads, seed {seed}) with random weights and a\n"
            "byte-level BPE tokenizer trained on a few sentences, written by\n"
            "`python3 -m stages.prompt_learning.tiny_llama <dir>`. Its answers are meaningless; it only exercises\n"
            "tensor/pipeline/data-parallel prompt learning end to end on CPU.\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m stages.prompt_learning.tiny_llama", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="output folder (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = build(args.folder, args.seed)
    print(f"wrote {out} ({LABEL})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
