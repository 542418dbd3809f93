"""Tiny RANDOMLY INITIALISED T5 / mT5 folders for tests and CI (no hub download needed).

    python3 -m stages.prompt_learning.tiny_models t5  data/tiny_models/t5_tiny_random
    python3 -m stages.prompt_learning.tiny_models mt5 data/tiny_models/mt5_tiny_random

Each folder is a normal Hugging Face seq2seq folder (``config.json``, ``model.safetensors``, tokenizer files,
``spiece.model``) that ``AutoModelForSeq2SeqLM`` / ``AutoTokenizer`` open offline:

  * the tokenizer is REAL: a SentencePiece Unigram model trained deterministically (one thread, no input
    shuffling) on the small built-in corpus below, with T5's id layout (``<pad>``=0, ``</s>``=1, ``<unk>``=2)
    and T5's 100 sentinels ``<extra_id_0..99>`` appended after the SentencePiece pieces (``<extra_id_0>`` is
    the last id, as in google/t5-*). It is wrapped as the transformers ``T5Tokenizer`` (the tokenizer class of
    both T5 and mT5);
  * the weights are RANDOM (seeded): d_model 64, 2 encoder + 2 decoder layers, 4 heads, d_ff 128, in the T5 v1.1
    layout of the checkpoints the recipes name (google/t5-base-lm-adapt, google/mt5-base): gated-GELU feed-forward
    and no down-scaling of the decoder output (``tie_word_embeddings=False``; transformers 5 then still shares the
    output layer with the embeddings but drops the d_model**-0.5 scale). ``t5`` is T5Config /
    T5ForConditionalGeneration with an English tokenizer, ``mt5`` MT5Config / MT5ForConditionalGeneration with a
    multilingual corpus and a larger vocabulary. (The original-T5 layout, ReLU and a down-scaled output, gives
    such a flat random output distribution that a soft prompt can hardly move it: useless for learning tests.)

Answers produced by these models are meaningless: they exist to run the engine end to end on CPU in seconds.
The folder says so in ``README.txt`` and in ``config.json`` (``promptlaunch_note``).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

LABEL = "RANDOMLY INITIALISED — for tests only"
FAMILIES = ("t5", "mt5")

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
    """The deterministic training text of the tokenizer (mT5: English + several other scripts)."""
    lines = list(_EN) + (list(_MULTI) if family == "mt5" else [])
    # a few template-shaped lines, so "Question:", "Context:" and "Answer:" become pieces
    for i, line in enumerate(lines[:9]):
        lines.append(f"Question: {lines[(i + 1) % 9]} Context: {line} Answer: {line.split()[-1]}")
    return lines


def build_tokenizer(family: str, folder: Path) -> "object":
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


def build(family: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` (t5 | mt5) model + real tokenizer into ``folder``; returns the folder."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    folder = Path(folder)
    from stages.common.io import _umask, atomic_dir

    with atomic_dir(folder) as tmp:
        tmp = Path(tmp)
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
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        for f in tmp.iterdir():   # some writers create 0600 files; a shared data folder needs the usual mode
            f.chmod(0o666 & ~_umask())
        (tmp / "README.txt").write_text(
            f"{LABEL}\n\nA tiny {family} (d_model 64, 2+2 layers, 4 heads, d_ff 128, seed {seed}) with random weights and a\n"
            "SentencePiece tokenizer trained on a few sentences, written by\n"
            f"`python3 -m stages.prompt_learning.tiny_models {family} <dir>`. Its answers are meaningless; it only\n"
            "exercises the promptlaunch engine end to end on CPU.\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m stages.prompt_learning.tiny_models", description=__doc__.split("\n\n")[0])
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
