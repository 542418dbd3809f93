"""Shared pieces of the benchmarks: one model/tokenizer/template setup, SQuAD paragraph batches, PEFT wrapping
(timing, FLOPs, ratios and results are in ``measure.py``).

Why one module: every bench must compare the engine and Hugging Face PEFT on exactly the same model, the same
SQuAD questions, the same batches and the same prompt table; building those in one place is what guarantees it.
Everything heavy (torch, transformers, peft) is imported lazily, so ``launcher_overhead.py`` stays torch-free
while it times.
"""
from __future__ import annotations

import argparse

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
DEFAULT_CONFIG = ROOT / "conf" / "prompt_learning" / "gpt" / "squad_cpu.yaml"   # template, init text, lr
DEFAULT_DATA_DIR = ROOT / "data"
RESULTS_DIR = ROOT / "bench" / "results"
SQUAD_FILES = {"train": "squad_train.jsonl", "dev": "squad_val.jsonl"}


# ---- model, tokenizer, template -------------------------------------------------------------------
@dataclass
class Setup:
    """The frozen model and everything both sides of a comparison share."""

    model: Any
    tokenizer: Any
    info: Any                      # stages.engine.examples.TokenizerInfo
    template: Any                  # stages.engine.template.TaskTemplate
    family: Any                    # DecoderOnlyFamily
    model_path: str
    init_text: str | None
    lr: float
    device: str = "cpu"            # where the model, the prompt tables and the batches live (--device)


def default_task(config: str | os.PathLike[str] = DEFAULT_CONFIG) -> tuple[list[dict[str, Any]], str | None, float]:
    """(task_templates, prompt init text, learning rate) of the CPU prompt-learning config: the bench measures what
    the default pipeline trains, not a template of its own."""
    from omegaconf import OmegaConf

    m = OmegaConf.to_container(OmegaConf.load(str(config)), resolve=False)["model"]
    texts = ((m.get("prompt_tuning") or {}).get("new_prompt_init_text")) or [None]
    return m["task_templates"], texts[0], float(m["optim"]["lr"])


def arg_parser(description: str, *, name: str, batches: int, device: bool = False) -> argparse.ArgumentParser:
    """The flags every model bench takes (model, data, batches, prompt table, threads, output); each adds its own.
    ``device``: the bench also takes ``--device`` (it puts its batches and tables on the model's device)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--attn", default="eager", help="attention implementation (the CPU config uses eager)")
    if device:
        ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the model, prompt tables and batches live (cuda: the first visible GPU)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--batches", type=int, default=batches, help="distinct batches per pass")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="paragraph order (and the random prompt table)")
    ap.add_argument("--init", default="text", choices=["text", "random"], help="prompt table init (without --artifact)")
    ap.add_argument("--artifact", default=None, help="start from this prompt artifact's table instead")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--host-memory", default="reuse", choices=["reuse", "default"],
                    help="reuse = what the stages do by default (trainer.reuse_host_memory=true, stages/engine/host_memory.py), "
                         "for every side of the comparison: it is process-wide; default = glibc malloc as it comes")
    ap.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"))
    return ap


def setup_from_args(args: argparse.Namespace) -> Setup:
    """Apply --host-memory and --threads, then ``load_setup`` with --model, --attn and --device."""
    from stages.engine.host_memory import reuse_host_memory

    reuse_host_memory(args.host_memory == "reuse", "--host-memory")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return load_setup(args.model, args.attn, device=getattr(args, "device", "cpu"))


def accelerator(device: str) -> str:
    """The stages' ``trainer.accelerator`` spelling of a bench ``--device`` (what stages/common/precision.py takes)."""
    return "gpu" if device == "cuda" else "cpu"


def check_device(device: str) -> None:
    """``--device cuda`` needs a CUDA device: one line saying why not (bench/gpu_env.py's rule), not a traceback."""
    if device == "cuda":
        import torch

        from gpu_env import why_no_cuda

        why = why_no_cuda(torch)
        if why:
            raise SystemExit(f"--device cuda: {why}")


def load_setup(model_path: str = DEFAULT_MODEL, attn: str | None = "eager", config: str | os.PathLike[str] = DEFAULT_CONFIG,
               templates: list[dict[str, Any]] | None = None, device: str = "cpu") -> Setup:
    """Load the base model exactly as the prompt_learning stage does (resolve -> fp32, frozen, attention
    implementation of the CPU config) onto ``device``, and the first task template of ``config`` (or ``templates``)."""
    from stages.engine.template import parse_templates
    from stages.engine import examples as D
    from stages.engine.family import family_for
    from stages.engine.base_model import load_model, load_tokenizer, resolve

    task_templates, init_text, lr = default_task(config)
    parsed = parse_templates(templates or task_templates, "task_templates")
    template = next(iter(parsed.values()))
    resolved = resolve(model_path, "--model")
    tokenizer = load_tokenizer(resolved.location, "--model")
    check_device(device)
    model = load_model(resolved.location, attn_implementation=attn).to(device)
    family = family_for(model.config, tokenizer)
    if family.name != "gpt":
        raise SystemExit(f"--model {model_path}: the benches compare decoder-only prompt tuning with PEFT; got family {family.name}")
    return Setup(model, tokenizer, D.TokenizerInfo(tokenizer), template, family, model_path, init_text, lr, device)


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    """A collated batch with its tensors on ``device`` (moved before timing, like the collation itself)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def prompt_table(setup: Setup, *, init: str = "text", seed: int = 1234, artifact: str | None = None) -> Any:
    """The [virtual tokens, hidden] prompt table both sides start from, on the setup's device: a trained one from a
    prompt artifact, or the engine's own initialiser (``init``: text = the CPU config's init sentence, random = seeded
    Gaussian, drawn on CPU so a seed gives the same table on every device)."""
    from stages.engine.prompts import init_table

    n = setup.template.total_virtual_tokens
    if artifact:
        from stages.engine.artifact import load_artifact

        _, templates, tables = load_artifact(artifact, "--artifact")
        if setup.template.taskname not in tables:
            raise SystemExit(f"--artifact {artifact}: no table for task '{setup.template.taskname}' (has {sorted(tables)})")
        table = tables[setup.template.taskname]
        if templates[setup.template.taskname].prompt_template != setup.template.prompt_template:
            raise SystemExit(f"--artifact {artifact}: trained with template {templates[setup.template.taskname].prompt_template!r}, "
                             f"the bench uses {setup.template.prompt_template!r} (conf/prompt_learning/gpt/squad_cpu.yaml)")
        if tuple(table.shape) != (n, setup.model.config.hidden_size):
            raise SystemExit(f"--artifact {artifact}: table shape {list(table.shape)} does not fit {n} virtual tokens x hidden "
                             f"{setup.model.config.hidden_size} of {setup.model_path}")
        return table.float().clone().to(setup.device)
    return init_table(init, n, setup.model.get_input_embeddings().weight, setup.tokenizer, seed=seed,
                      task=setup.template.taskname, text=setup.init_text).to(setup.device)


def prompt_store(setup: Setup, table: Any, *, trainable: bool) -> Any:
    """The engine's PromptStore holding ``table`` (trainable for training, frozen for generation)."""
    from stages.engine.prompts import PromptStore

    store = PromptStore([setup.template.taskname], int(table.shape[1]))
    (store.add_table if trainable else store.add_frozen)(setup.template.taskname, table)
    return store


def peft_prompt_model(setup: Setup, table: Any) -> Any:
    """``get_peft_model(model, PromptTuningConfig(CAUSAL_LM, same virtual token count))`` with its prompt embedding
    set to ``table``: PEFT as a user would write it, starting from our exact initial prompt. PEFT wraps the same
    frozen model object (prompt tuning adds no layers), so both sides run the same weights."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    check_peft_layout(setup)
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=setup.template.total_virtual_tokens,
                             prompt_tuning_init=PromptTuningInit.RANDOM)
    pm = get_peft_model(setup.model, cfg)
    emb = pm.prompt_encoder[pm.active_adapter].embedding
    with torch.no_grad():
        emb.weight.copy_(table.to(emb.weight.dtype))
    return pm


def check_peft_layout(setup: Setup) -> None:
    """PEFT prompt tuning can only express templates whose virtual tokens all come first, with no BOS before them
    (the export's own rule, ``export.peft_exact``); anything else would compare different token sequences."""
    from stages.engine.export import peft_exact

    exact, why = peft_exact(setup.template, setup.info)
    if not exact:
        raise SystemExit(f"{setup.model_path}, template {setup.template.prompt_template!r}: {why}; "
                         "PEFT prompt tuning cannot express it, so the two sides would see different sequences")


def without_virtual(ids: Sequence[int], vidx: Sequence[int], *seqs: Sequence[int]) -> tuple[list[int], ...]:
    """An engine example/prompt as PEFT takes it: the leading virtual slots removed (PEFT prepends its own).
    ``seqs`` (e.g. labels) are cut the same way. Refuses a virtual slot anywhere but the leading block."""
    n = 0
    while n < len(vidx) and vidx[n] >= 0:
        n += 1
    if any(v >= 0 for v in vidx[n:]) or list(vidx[:n]) != list(range(n)):
        raise ValueError("virtual tokens are not one leading block 0..n-1; PEFT prompt tuning cannot express this example")
    return (list(ids[n:]), *(list(s[n:]) for s in seqs))


# ---- SQuAD ------------------------------------------------------------------------------------------
def squad_records(split: str, data_dir: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> list[dict[str, Any]]:
    """Records of ``squad_train.jsonl`` (split=train) or ``squad_val.jsonl`` (dev) written by the data_preparation
    stage; when they are missing the stage itself is run (``main.py stages=[data_preparation]``), so the bench
    reads exactly the files training and evaluation read."""
    path = Path(data_dir) / "prompt_data" / "v1.1" / SQUAD_FILES[split]
    if not path.is_file():
        cmd = [sys.executable, str(ROOT / "main.py"), "stages=[data_preparation]", f"data_dir={Path(data_dir).resolve()}"]
        print(f"{path} is missing: running {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def paragraphs(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive records with the same context (SQuAD files list a paragraph's questions together)."""
    groups: list[list[dict[str, Any]]] = []
    for rec in records:
        if groups and groups[-1][0]["context"] == rec["context"]:
            groups[-1].append(rec)
        else:
            groups.append([rec])
    return groups


def paragraph_batches(records: Sequence[dict[str, Any]], *, n_batches: int, batch_size: int, seed: int,
                      keep: Callable[[dict[str, Any]], bool] = lambda r: True) -> list[list[dict[str, Any]]]:
    """``n_batches`` batches of ``batch_size`` questions taken as whole paragraphs in a seeded random order (a
    paragraph may continue into the next batch), so about five questions share each context: the composition
    shared-context prefixes are built for, and the same list is handed to every side. Paragraphs with a question
    ``keep`` rejects (e.g. too long) are skipped whole."""
    import random

    groups = paragraphs(records)
    random.Random(seed).shuffle(groups)
    flat: list[dict[str, Any]] = []
    need = n_batches * batch_size
    for g in groups:
        if len(flat) >= need:
            break
        if all(keep(r) for r in g):
            flat += g
    if len(flat) < need:
        raise SystemExit(f"only {len(flat)} usable questions for {n_batches} batches of {batch_size}; lower --batches or raise --max-seq-length")
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


# ---- FLOPs and matmul peak -------------------------------------------------------------------------------


