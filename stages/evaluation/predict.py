"""Answer a JSONL from the command line with a tuned prompt: records without gold answers, tasks mixed in one file
(NeMo's ``megatron_gpt_eval`` with mixed tasks), one prediction per record.

    python3 -m stages.evaluation.predict --artifact RESULTS/prompt_artifact --input questions.jsonl \\
        --output predictions.jsonl [--language-model-path MODEL] [--tokens-to-generate 32] [--batch-size 8]

Each input line is ``{"taskname": ..., <the template's fields>}``; the output line is the same record with
``"prediction"`` added, in input order. Decoding is the evaluation stage's: greedy, batched across tasks, the answer
cut at the first stop string after its leading whitespace (``--stop-strings``, default a newline). Any problem
with the input or the artifact is one ``error:`` line naming ``file:line`` or the option, and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from stages.common.errors import UserError
from stages.common.io import write_jsonl

log = logging.getLogger("promptlaunch.evaluation")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m stages.evaluation.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, help="a prompt artifact folder or a NeMo prompt-learning .nemo")
    p.add_argument("--input", required=True, help="JSONL of records: taskname and the template's fields")
    p.add_argument("--output", required=True, help="JSONL written: each record with its prediction")
    p.add_argument("--language-model-path", default=None, help="the base model (default: the artifact's)")
    p.add_argument("--tokens-to-generate", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--stop-strings", nargs="*", default=["\n"], help="end an answer at any of these (default: newline)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def predict(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Read and check every record, load the prompted model, answer, write ``--output``; the written records."""
    from stages.engine.artifact import load_artifact
    from stages.engine.prompted_model import PromptedModel

    from .data import read_slice, template_for

    for name in ("tokens_to_generate", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be an integer >= 1, got {getattr(args, name)}")
    # the records against the artifact's templates first: cheap, before the slow model load
    data = read_slice(Path(args.input), 0, None, key="--input")
    _, templates, _ = load_artifact(args.artifact, "--artifact")
    for ln in data.lines:
        template_for(ln.record, f"{data.path}:{ln.line}", templates, f"the prompt artifact {args.artifact}")
    try:
        model = PromptedModel.load(args.artifact, args.language_model_path, device=args.device)
    except UserError as exc:   # the engine names its arguments; name the options instead
        msg = str(exc)
        for arg, option in (("artifact_path", "--artifact"), ("language_model_path", "--language-model-path")):
            if msg.startswith(arg):
                raise UserError(option + msg[len(arg):]) from None
        raise
    records = [ln.record for ln in data.lines]
    answers = model.generate(records, tokens_to_generate=args.tokens_to_generate, batch_size=args.batch_size,
                             stop_strings=tuple(s for s in args.stop_strings if s), progress=not args.no_progress)
    out = [{**rec, "prediction": answer} for rec, answer in zip(records, answers)]
    write_jsonl(args.output, out)
    tasks = {t: sum(r["taskname"] == t for r in records) for t in sorted({r["taskname"] for r in records})}
    log.info("wrote %d predictions (%s) to %s", len(out), ", ".join(f"{t}: {n}" for t, n in tasks.items()), args.output)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from stages.common.entry import setup_logging

    args = parse_args(argv)
    setup_logging()
    try:
        predict(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
