"""Answer a JSONL of records with a tuned prompt in vLLM, through ``prompt_embeds``.

Copied into every ``export/vllm/<task>/`` folder of a prompt artifact; run it from there (or name the folder):

    python3 generate_vllm.py --records questions.jsonl --output answers.jsonl [--model BASE] [--tokens 32]

Each record (the template's fields, e.g. ``{"context": ..., "question": ...}``) is laid out with the task's
template exactly as training and evaluation lay it out, with the tuned prompt rows at the virtual markers and the
base model's input embeddings elsewhere (``stages.engine.prompt_embeds.PromptEmbedder``); vLLM then decodes
greedily from those embeddings. Needs promptlaunch importable (``pip install -e <promptlaunch>``), vLLM
(``pip install vllm``) and a GPU; without vLLM or a GPU it says so and exits with 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", default=str(Path(__file__).resolve().parent),
                        help="the export/vllm/<task> folder (default: this script's folder)")
    parser.add_argument("--records", required=True, help="JSONL, one record per line with the template's fields")
    parser.add_argument("--output", required=True, help="JSONL written: each record with its 'prediction'")
    parser.add_argument("--model", default=None, help="the base model (default: the one the prompt was trained with)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate at most")
    args = parser.parse_args(argv)

    import torch

    from stages.engine.prompt_embeds import PromptEmbedder, cut_answer, load_vllm_export

    export = load_vllm_export(args.export)
    model = args.model or export.language_model_path
    embed = PromptEmbedder.from_base_model(export, model)
    lines = Path(args.records).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    prompts = [{"prompt_embeds": embed(r, args.tokens, where=f"{args.records}:{i + 1}")} for i, r in enumerate(records)]

    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("vLLM skipped: vLLM is not installed (pip install vllm; it needs a GPU)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("vLLM skipped: no GPU is visible (vLLM's prompt_embeds runs on a GPU)", file=sys.stderr)
        return 2
    llm = LLM(model=model, enable_prompt_embeds=True, dtype="float32")
    # greedy, no stop strings here: the answer is cut as evaluation cuts it (after its leading whitespace)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.tokens))
    with open(args.output, "w", encoding="utf-8") as fh:
        for record, out in zip(records, outputs):
            answer = cut_answer(out.outputs[0].text, export.spec["stop_strings"])
            fh.write(json.dumps({**record, "prediction": answer}, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} answers to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
