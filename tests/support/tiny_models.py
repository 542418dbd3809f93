"""Tiny RANDOMLY INITIALISED models for tests and CI, one builder for llama, t5 and mt5 (no hub download needed).

    python3 -m tests.support.tiny_models llama data/tiny_models/llama_tiny_random
    python3 -m tests.support.tiny_models t5    data/tiny_models/t5_tiny_random
    python3 -m tests.support.tiny_models mt5   data/tiny_models/mt5_tiny_random

(run from the repository root). Each folder is a normal Hugging Face folder (``config.json``, ``model.safetensors``,
tokenizer files) that the ``AutoModel...`` / ``AutoTokenizer`` classes open offline, written atomically:

  * ``llama``: a ``LlamaForCausalLM`` with hidden 64, 4 attention heads, 2 key/value heads, intermediate 128 and
    4 decoder layers, so tensor parallelism of 2 and pipeline parallelism of 2 (or 4) all fit (the embedded
    SmolLM2-135M, 9 attention heads and 3 key/value heads, cannot be split by TP=2), and a byte-level BPE tokenizer
    trained deterministically on a few built-in sentences (byte fallback: it encodes any text, e.g. real SQuAD);
  * ``t5`` / ``mt5``: the tokenizer is REAL: a SentencePiece Unigram model trained deterministically (one thread,
    no input shuffling) on the small built-in corpus below, with T5's id layout (``<pad>``=0, ``</s>``=1,
    ``<unk>``=2) and T5's 100 sentinels ``<extra_id_0..99>`` appended after the SentencePiece pieces
    (``<extra_id_0>`` is the last id, as in google/t5-*). It is wrapped as the transformers ``T5Tokenizer`` (the
    tokenizer class of both T5 and mT5). The weights are RANDOM (seeded): d_model 64, 2 encoder + 2 decoder layers,
    4 heads, d_ff 128, in the T5 v1.1 layout of the checkpoints the recipes name (google/t5-base-lm-adapt,
    google/mt5-base): gated-GELU feed-forward and no down-scaling of the decoder output
    (``tie_word_embeddings=False``; transformers 5 then still shares the output layer with the embeddings but drops
    the d_model**-0.5 scale). ``t5`` is T5Config / T5ForConditionalGeneration with an English tokenizer, ``mt5``
    MT5Config / MT5ForConditionalGeneration with a multilingual corpus and a larger vocabulary. (The original-T5
    layout, ReLU and a down-scaled output, gives such a flat random output distribution that a soft prompt can
    hardly move it: useless for learning tests.)

Answers produced by these models are meaningless: they exist to run the engine end to end on CPU in seconds.
Every folder says so in ``README.txt`` and in ``config.json`` (``promptlaunch_note``).

In-process, the tests use :func:`build` (what the command line writes) and two smaller Llama variants:

  * :func:`make_model_dir` / :func:`make_tokenizer`: the engine tests' Llama folder (hidden 32, 2 layers, 4 heads,
    4 key/value heads) and its BPE tokenizer, trained on a shorter corpus (:data:`ENGINE_CORPUS`);
  * :func:`tiny_llama` / :func:`tiny_llama_config`: the parallel-engine tests' seeded in-memory Llama (the
    ``llama`` sizes, vocabulary 128, tied embeddings, no tokenizer, no folder).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any, Callable

LABEL = "RANDOMLY INITIALISED — for tests only"
FAMILIES = ("llama", "t5", "mt5")
PROG = "python3 -m tests.support.tiny_models"

# ----------------------------------------------------------------------------------------------------------
# llama: byte-level BPE tokenizer + LlamaForCausalLM
# ----------------------------------------------------------------------------------------------------------

LLAMA_CORPUS = [
    "Context: The capital of France is Paris. Question: What is the capital of France? Answer: Paris",
    "Context: Water boils at one hundred degrees. Question: When does water boil? Answer: one hundred degrees",
    "The Eiffel Tower was completed in 1889 in Paris, France. Gustave Eiffel's company designed and built the tower.",
    "Which state has its capital in the north? What is the population of the city? When was it founded?",
    "The quick brown fox jumps over the lazy dog. Sentiment: positive negative neutral Review: good bad",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"()-",
]
# the engine tests' corpus (their token ids depend on it)
ENGINE_CORPUS = [
    "Context: The capital of France is Paris. Question: What is the capital of France? Answer: Paris",
    "Context: Water boils at one hundred degrees. Question: When does water boil? Answer: one hundred degrees",
    "The quick brown fox jumps over the lazy dog. Sentiment: positive negative neutral Review: good bad",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"()-",
]
# the ``llama`` sizes: TP=2 and PP=2 (or 4) all fit
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
ENGINE_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def llama_tokenizer(corpus: list[str] = LLAMA_CORPUS, vocab_size: int = 400) -> Any:
    """Byte-level BPE trained on ``corpus`` (deterministic), EOS ``<|endoftext|>``, pad ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<pad>")


def build_llama(folder: str | Path, seed: int = 0, *, sizes: dict[str, int] = SIZES, corpus: list[str] = LLAMA_CORPUS,
                head_scale: float = 10.0, **overrides: Any) -> Path:
    """Write a tiny random Llama + BPE tokenizer into ``folder`` (atomically); returns the folder."""
    def make(tmp: Path) -> tuple[Any, Any, str]:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = llama_tokenizer(corpus)
        kw = dict(sizes, vocab_size=len(tok), max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False, promptlaunch_note=LABEL)
        kw.update(overrides)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**kw))
        with torch.no_grad():   # a spikier output distribution: greedy decoding is less tie-prone
            model.lm_head.weight.mul_(head_scale)
        about = (f"A tiny Llama (hidden {kw['hidden_size']}, {kw['num_hidden_layers']} layers, {kw['num_attention_heads']} "
                 f"heads, {kw['num_key_value_heads']} KV heads, seed {seed}) with random weights and a\n"
                 "byte-level BPE tokenizer trained on a few sentences, written by\n"
                 f"`{PROG} llama <dir>`. Its answers are meaningless; it only exercises\n"
                 "(tensor/pipeline/data-parallel) prompt learning end to end on CPU.\n")
        return model, tok, about

    return _write(folder, make)


def make_tokenizer() -> Any:
    """The engine tests' BPE tokenizer (:data:`ENGINE_CORPUS`), without a folder."""
    return llama_tokenizer(ENGINE_CORPUS)


def make_model_dir(path: str | Path, seed: int = 0) -> Path:
    """The engine tests' Llama folder: hidden 32, intermediate 64, 2 layers, 4 heads, 4 KV heads, output x20."""
    return build_llama(path, seed, sizes=ENGINE_SIZES, corpus=ENGINE_CORPUS, head_scale=20.0, max_position_embeddings=512)


def tiny_llama_config(**overrides: Any) -> Any:
    """The parallel-engine tests' Llama config: the ``llama`` sizes, vocabulary 128, tied embeddings, sdpa."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128,
        **SIZES,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        pad_token_id=0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(state_dict: dict | None = None, **overrides: Any) -> Any:
    """A seeded random fp32 LlamaForCausalLM in memory (or one loaded from ``state_dict``), eval mode, frozen."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).float().eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------
# t5 / mt5: SentencePiece tokenizer + T5 v1.1 layout
# ----------------------------------------------------------------------------------------------------------

_EN = [
    # the tests/fixtures/squad_tiny texts (so the fixture tokenises into real pieces) ...
    "The Eiffel Tower was completed in 1889 in Paris, France.",
    "When was the Eiffel Tower completed? In which city is the Eiffel Tower?",
    "Gustave Eiffel's company designed and built the tower. Whose company built the tower? What did the company build?",
    "München is the capital of Bavaria; its famous festival is the Oktoberfest — held since 1810.",
    "Which state has München as its capital? What is München's famous festival? Since when has the Oktoberfest been held?",
    "Zürich lies on Lake Zürich; the city's population is about 420,000 people.",
    "What lake is Zürich on? What is the population of Zürich?",
    "Tokyo (東京) became Japan's capital in 1868. What is Tokyo called in Japanese? When did Tokyo become the capital?",
    "Which country's capital is Tokyo?",
    # ... template words and general English
    "Question: Context: Answer: Review: Sentiment: positive negative neutral",
    "The capital of France is Paris. What is the capital of France? Paris",
    "Water boils at one hundred degrees. When does water boil? At one hundred degrees.",
    "The quick brown fox jumps over the lazy dog. A good dog, a bad fox.",
    "Who wrote the book? Where is the river? How many people live in the city? Why is the sky blue?",
    "The river flows through the valley to the sea, and the mountains are covered with snow in winter.",
    "In 1905 the scientist published four papers about light, motion, energy and mass.",
    "The colour of the sky is blue, the grass is green and the sun is yellow.",
    "one two three four five six seven eight nine ten eleven twelve hundred thousand million",
    "January February March April May June July August September October November December",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday morning evening night",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"()-—[]{}/&%$#@*+=<>_~",
]
_MULTI = [
    "La tour Eiffel a été achevée en 1889 à Paris. Quelle est la capitale de la France ?",
    "Der Eiffelturm wurde 1889 fertiggestellt. München ist die Hauptstadt von Bayern. Wie heißt der See in Zürich?",
    "La Torre Eiffel fue terminada en 1889. ¿Cuál es la capital de España? Madrid es la capital.",
    "东京是日本的首都。 東京は日本の首都です。 富士山は日本で一番高い山です。",
    "Москва — столица России. Какая река течёт через город?",
    "Ο Πύργος του Άιφελ ολοκληρώθηκε το 1889. Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
]


def corpus(family: str) -> list[str]:
    """The deterministic training text of the T5 tokenizer (mT5: English + several other scripts)."""
    lines = list(_EN) + (list(_MULTI) if family == "mt5" else [])
    # a few template-shaped lines, so "Question:", "Context:" and "Answer:" become pieces
    for i, line in enumerate(lines[:9]):
        lines.append(f"Question: {lines[(i + 1) % 9]} Context: {line} Answer: {line.split()[-1]}")
    return lines


def build_tokenizer(family: str, folder: Path) -> Any:
    """Train the SentencePiece model into ``folder/spiece.model`` and return the T5Tokenizer built from it."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(family) * 4), model_writer=model, model_type="unigram",
        vocab_size=600 if family == "mt5" else 400, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tok = T5Tokenizer.from_pretrained(str(folder), extra_ids=100)
    if tok.convert_tokens_to_ids("<extra_id_0>") in (None, tok.unk_token_id):
        raise RuntimeError("tiny tokenizer: <extra_id_0> missing")
    return tok


def build_t5(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` (t5 | mt5) model + real tokenizer into ``folder`` (atomically)."""
    def make(tmp: Path) -> tuple[Any, Any, str]:
        import torch

        tok = build_tokenizer(family, tmp)
        common = dict(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=16, relative_attention_max_distance=64, dropout_rate=0.0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                      promptlaunch_note=LABEL)
        torch.manual_seed(seed)
        if family == "t5":
            from transformers import T5Config, T5ForConditionalGeneration

            model = T5ForConditionalGeneration(T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common))
        else:
            from transformers import MT5Config, MT5ForConditionalGeneration

            model = MT5ForConditionalGeneration(MT5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common))
        about = (f"A tiny {family} (d_model 64, 2+2 layers, 4 heads, d_ff 128, seed {seed}) with random weights and a\n"
                 "SentencePiece tokenizer trained on a few sentences, written by\n"
                 f"`{PROG} {family} <dir>`. Its answers are meaningless; it only\n"
                 "exercises the promptlaunch engine end to end on CPU.\n")
        return model, tok, about

    return _write(folder, make)


# ----------------------------------------------------------------------------------------------------------
# one entry point
# ----------------------------------------------------------------------------------------------------------

def _write(folder: str | Path, make: Callable[[Path], tuple[Any, Any, str]]) -> Path:
    """``make(tmp)`` -> (model, tokenizer, what README.txt says); all saved into ``folder`` as a whole (atomic), files
    with the usual mode. ``tmp`` is the folder being written (the T5 tokenizer trains its spiece.model into it)."""
    from stages.common.io import _umask, atomic_dir

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        tmp = Path(tmp)
        model, tok, about = make(tmp)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        for f in tmp.iterdir():   # safetensors writes 0600; a shared data folder needs the usual mode
            f.chmod(0o666 & ~_umask())
        (tmp / "README.txt").write_text(f"{LABEL}\n\n{about}", encoding="utf-8")
    return folder


def build(family: str, folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random ``family`` (llama | t5 | mt5) folder, as the command line does; returns the folder.
    ``overrides`` (llama only) go into the LlamaConfig, e.g. ``max_position_embeddings=256``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "llama":
        return build_llama(folder, seed, **overrides)
    if overrides:
        raise ValueError(f"{family}: no config overrides ({sorted(overrides)})")
    return build_t5(family, folder, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("folder", help="output folder (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build(a.family, a.folder, a.seed)
    print(f"wrote {out} ({a.family}, {LABEL})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
