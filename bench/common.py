"""Shared pieces of the benchmarks: one model/tokenizer/template setup, SQuAD paragraph batches, PEFT wrapping,
timing, FLOP counting, tables and JSON results.

Why one module: every bench must compare the engine and Hugging Face PEFT on exactly the same model, the same
SQuAD questions, the same batches and the same prompt table; building those in one place is what guarantees it.
Everything heavy (torch, transformers, peft) is imported lazily, so ``launcher_overhead.py`` stays torch-free
while it times.
"""
from __future__ import annotations

import argparse

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages.common.io import write_json  # noqa: E402

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
DEFAULT_CONFIG = ROOT / "conf" / "prompt_learning" / "gpt" / "squad_cpu.yaml"   # template, init text, lr
DEFAULT_DATA_DIR = ROOT / "data"
RESULTS_DIR = ROOT / "bench" / "results"
SQUAD_FILES = {"train": "squad_train.jsonl", "dev": "squad_val.jsonl"}


# ---- machine, command, results -------------------------------------------------------------------
CPU_MATMUL_FLAGS = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8"}


def machine_info() -> dict[str, Any]:
    """What a figure depends on: cores, threads, library versions, CPU model (read where it is cheap)."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            lines = fh.readlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
        flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
        # the matmul features a figure depends on (a machine with AVX2 only computes bf16 by emulation)
        info["cpu_matmul_flags"] = sorted(flags & CPU_MATMUL_FLAGS)
    except OSError:
        pass
    try:
        info["loadavg_1min"] = os.getloadavg()[0]   # > cores means the figures were taken on a busy machine
    except OSError:
        pass
    if "torch" in sys.modules:   # only when the bench itself uses torch (launcher_overhead does not)
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_interop_threads=torch.get_num_interop_threads(),
                    cpu_capability=torch.backends.cpu.get_cpu_capability())
        from stages.engine.host_memory import in_effect

        info["reuse_host_memory"] = in_effect()   # the stages' trainer.reuse_host_memory (--host-memory)
        for mod in ("transformers", "peft"):
            if mod in sys.modules:
                info[mod] = getattr(sys.modules[mod], "__version__", "?")
    return info


def command_line() -> str:
    """The exact command that produced a result file (shell-quoted, relative to the repository root)."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_result(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Atomically write a bench result with the machine, the command and the time it was taken."""
    doc = {**payload, "machine": machine_info(), "command": command_line(),
           "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(machine_line(doc["machine"]))
    return write_json(path, doc)


def machine_line(m: dict[str, Any]) -> str:
    """The machine a printed figure came from, in one line (the CPU model varies between sessions)."""
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "transformers", "peft") if k in m)
    return (f"machine: {m.get('cpu_model', '?')}, {m.get('affinity_cpus', m.get('cpu_count'))} cores, "
            f"torch CPU capability {m.get('cpu_capability', '?')}, flags {' '.join(m.get('cpu_matmul_flags', [])) or '?'}; "
            f"{versions}; load {m.get('loadavg_1min', float('nan')):.2f}")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width text table (floats with 3 significant decimals)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(lines)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def interleaved_timing(sides: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each side's callable, ``repeats`` times, interleaved (A B C A B C ...), so a change in
    machine load hits every side alike instead of biasing whichever ran last."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_speedup(ref: Sequence[float], side: Sequence[float]) -> float:
    """Median over rounds of ref's pass / side's pass in the same round: robust to this VM's drift across rounds
    (the ratio of the two medians can pair a slow round of one side with a fast round of the other)."""
    return median([a / b for a, b in zip(ref, side)])


def add_speedups(rows: dict[str, dict[str, Any]], baseline: str, refused: str | None) -> None:
    """``speedup_vs_peft`` and ``speedup_vs_peft_paired`` (against row ``baseline``) on every row, or None on all of
    them when ``refused`` says why the baseline's output is wrong: a ratio against a baseline that computes
    something else is not a result."""
    ref = rows[baseline]
    for r in rows.values():
        r["speedup_vs_peft"] = None if refused else ref["median_pass_seconds"] / r["median_pass_seconds"]
        r["speedup_vs_peft_paired"] = None if refused else paired_speedup(ref["pass_seconds"], r["pass_seconds"])


def refusal_line(refused: str | None) -> list[str]:
    """The report's line when ratios were refused (empty otherwise)."""
    return [f"NO RATIO: {refused}"] if refused else []


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


def default_task(config: str | os.PathLike[str] = DEFAULT_CONFIG) -> tuple[list[dict[str, Any]], str | None, float]:
    """(task_templates, prompt init text, learning rate) of the CPU prompt-learning config: the bench measures what
    the default pipeline trains, not a template of its own."""
    from omegaconf import OmegaConf

    m = OmegaConf.to_container(OmegaConf.load(str(config)), resolve=False)["model"]
    texts = ((m.get("prompt_tuning") or {}).get("new_prompt_init_text")) or [None]
    return m["task_templates"], texts[0], float(m["optim"]["lr"])


def arg_parser(description: str, *, name: str, batches: int) -> argparse.ArgumentParser:
    """The flags every model bench takes (model, data, batches, prompt table, threads, output); each adds its own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--attn", default="eager", help="attention implementation (the CPU config uses eager)")
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
    """Apply --host-memory and --threads, then ``load_setup`` with --model and --attn."""
    from stages.engine.host_memory import reuse_host_memory

    reuse_host_memory(args.host_memory == "reuse", "--host-memory")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return load_setup(args.model, args.attn)


def load_setup(model_path: str = DEFAULT_MODEL, attn: str | None = "eager", config: str | os.PathLike[str] = DEFAULT_CONFIG,
               templates: list[dict[str, Any]] | None = None) -> Setup:
    """Load the base model exactly as the prompt_learning stage does (resolve -> fp32, frozen, attention
    implementation of the CPU config) and the first task template of ``config`` (or ``templates``)."""
    from stages.engine.template import parse_templates
    from stages.engine import examples as D
    from stages.engine.family import family_for
    from stages.engine.base_model import load_model, load_tokenizer, resolve

    task_templates, init_text, lr = default_task(config)
    parsed = parse_templates(templates or task_templates, "task_templates")
    template = next(iter(parsed.values()))
    resolved = resolve(model_path, "--model")
    tokenizer = load_tokenizer(resolved.location, "--model")
    model = load_model(resolved.location, attn_implementation=attn)
    family = family_for(model.config, tokenizer)
    if family.name != "gpt":
        raise SystemExit(f"--model {model_path}: the benches compare decoder-only prompt tuning with PEFT; got family {family.name}")
    return Setup(model, tokenizer, D.TokenizerInfo(tokenizer), template, family, model_path, init_text, lr)


def prompt_table(setup: Setup, *, init: str = "text", seed: int = 1234, artifact: str | None = None) -> Any:
    """The [virtual tokens, hidden] prompt table both sides start from: a trained one from a prompt artifact, or
    the engine's own initialiser (``init``: text = the CPU config's init sentence, random = seeded Gaussian)."""
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
        return table.float().clone()
    return init_table(init, n, setup.model.get_input_embeddings().weight, setup.tokenizer, seed=seed,
                      task=setup.template.taskname, text=setup.init_text)


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
def llama_dims(config: Any) -> dict[str, int]:
    """Matmul dimensions of a Llama-style decoder (hidden, layers, heads, kv heads, head dim, MLP, vocab)."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return dict(h=int(config.hidden_size), layers=int(config.num_hidden_layers), heads=heads,
                kv=int(getattr(config, "num_key_value_heads", heads) or heads), d=head_dim,
                ffn=int(config.intermediate_size), vocab=int(config.vocab_size))


def train_step_flops(config: Any, tokens: int, attn_pairs: int, logit_rows: int) -> dict[str, float]:
    """Analytic FLOPs of one prompt-tuning step (what the hardware executes, padding included).

    ``tokens``: positions run through the decoder; ``attn_pairs``: (query, key) pairs the attention computes (eager
    attention computes the whole padded grid); ``logit_rows``: positions whose LM-head logits are computed.
    Forward: q/k/v/o projections and the gated MLP on every position, attention scores and values on every pair,
    the LM head on ``logit_rows``. Backward: the weights are frozen, so only gradients to activations are computed:
    one matmul per linear layer (same cost as forward), two per attention matmul (to both operands), one for the LM
    head. Norms, softmax, RoPE and the loss are not matmuls and are left out."""
    g = llama_dims(config)
    linear = 2 * tokens * g["layers"] * (g["h"] * g["heads"] * g["d"] + 2 * g["h"] * g["kv"] * g["d"]
                                        + g["heads"] * g["d"] * g["h"] + 3 * g["h"] * g["ffn"])
    attn = 2 * 2 * g["layers"] * g["heads"] * g["d"] * attn_pairs
    head = 2 * logit_rows * g["h"] * g["vocab"]
    fwd = linear + attn + head
    bwd = linear + 2 * attn + head
    return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}


def batch_flops(config: Any, batch: dict[str, Any], logit_rows: int) -> float:
    """``train_step_flops`` of an engine batch: plain ([B, L] right-padded) or shared-prefix (``collate_shared``:
    prefixes [P, Lp] once, then suffixes [B, Ls] attending to their prefix's Lp slots and to themselves).

    In the shared layout autograd skips two pieces of backward, subtracted here: the prefixes' last-layer outputs
    feed nothing (only their keys/values do), so their last-layer query, attention, o_proj and MLP gradients are
    not computed; and the suffix embeddings carry no virtual token, so layer 0 computes no gradient into the
    suffix queries, keys and values. (In the plain layout the input embeddings require grad as a whole tensor,
    so everything is computed.) Checked against FlopCounterMode in tests/bench/test_bench.py."""
    b, ls = batch["input_ids"].shape
    if "prefix_input_ids" not in batch:
        return train_step_flops(config, b * ls, b * ls * ls, logit_rows)["total"]
    p, lp = batch["prefix_input_ids"].shape
    g = llama_dims(config)
    q, kv = g["h"] * g["heads"] * g["d"], g["h"] * g["kv"] * g["d"]
    skip_linear = 2 * p * lp * (2 * q + 3 * g["h"] * g["ffn"]) + 2 * b * ls * (q + 2 * kv)
    pair = 2 * g["heads"] * g["d"]   # one attention matmul, one (query, key) pair, one layer
    skip_attn = 4 * pair * p * lp * lp + pair * b * ls * (lp + ls)
    full = train_step_flops(config, p * lp + b * ls, p * lp * lp + b * ls * (lp + ls), logit_rows)["total"]
    return full - skip_linear - skip_attn


def counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs torch itself counts (``torch.utils.flop_counter.FlopCounterMode``) while ``fn`` runs once."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak(shapes: Sequence[tuple[int, int, int]], repeats: int = 5, min_seconds: float = 0.2) -> dict[str, Any]:
    """Best fp32 ``torch.mm`` GFLOP/s over ``shapes`` (m, k, n), each timed ``repeats`` times (best of), inner loops
    long enough to last ``min_seconds``: the practical peak of this machine for the model's own matmul sizes."""
    import torch

    per: dict[str, float] = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        inner = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-6)))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=out)
            best = min(best, (time.perf_counter() - t0) / inner)
        per[f"{m}x{k}x{n}"] = 2.0 * m * k * n / best / 1e9
    key = max(per, key=per.get)
    return {"peak_gflops": per[key], "peak_shape": key, "per_shape_gflops": per, "repeats": repeats}
