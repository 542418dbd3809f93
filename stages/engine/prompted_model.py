"""Generation API used by the evaluation stage: a frozen base model + the tuned prompt tables.

    pm = PromptedModel.load("results/prompt_artifact")                 # tuned
    base = PromptedModel.load(None, "embedded:smollm2-135m-instruct", task_templates=[...])   # untuned baseline
    answers = pm.generate([{"taskname": "squad", "context": ..., "question": ...}], tokens_to_generate=32)

No prompt encoder is needed: p-tuning artifacts store the encoder output as a plain table.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from stages.common.errors import UserError
from stages.engine.template import TaskTemplate, parse_templates

from . import examples as D
from .artifact import check_base, load_artifact
from .family import family_for
from .base_model import fingerprint, load_model, load_tokenizer, resolve
from .prompts import PromptStore

log = logging.getLogger("promptlaunch.prompt_learning")


class PromptedModel:
    templates: dict[str, TaskTemplate]

    def __init__(self, model: Any, tokenizer: Any, templates: dict[str, TaskTemplate], store: PromptStore | None,
                 info: dict[str, Any]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tok = D.TokenizerInfo(tokenizer)
        self.templates = templates
        self.store = store
        self.family = family_for(model.config, tokenizer)
        self._info = info
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    @classmethod
    def load(cls, artifact_path: str | None, language_model_path: str | None = None,
             task_templates: list[dict] | None = None, device: str = "cpu", precision: str = "32") -> "PromptedModel":
        """artifact_path=None gives the untuned baseline: same templates (from task_templates), no virtual tokens.
        language_model_path=None takes the base model recorded in the artifact. ``precision="bf16-true"``: the
        model computes in bf16 (cast after its fingerprint is taken; the prompt tables stay fp32). Errors are
        UserError."""
        meta: dict[str, Any] | None = None
        tables: dict[str, torch.Tensor] = {}
        if artifact_path is not None:
            meta, templates, tables = load_artifact(artifact_path, "artifact_path")
            if task_templates:
                given = parse_templates(task_templates, "task_templates")
                for name, t in given.items():
                    if name in templates and t.total_virtual_tokens != templates[name].total_virtual_tokens:
                        raise UserError(
                            f"task_templates[{name}]: {t.total_virtual_tokens} virtual tokens but artifact {artifact_path} "
                            f"has {templates[name].total_virtual_tokens}; drop task_templates to use the artifact's templates"
                        )
                templates = {**templates, **{n: t for n, t in given.items() if n in templates}}
            if language_model_path is None:
                language_model_path = meta["base_model"]["language_model_path"]
        else:
            if not task_templates:
                raise UserError("task_templates: required when artifact_path is None (the untuned baseline needs the task templates)")
            templates = parse_templates(task_templates, "task_templates")
            if language_model_path is None:
                raise UserError("language_model_path: required when artifact_path is None (no artifact to take the base model from)")
        key = "language_model_path"
        resolved = resolve(language_model_path, key)
        model = load_model(resolved.location, None, key).to(device)   # causal or seq2seq, from the config
        tokenizer = load_tokenizer(resolved.location, key)
        family = family_for(model.config, tokenizer).name
        fp = fingerprint(model)
        if precision == "bf16-true":
            model.to(torch.bfloat16)
        store = None
        if meta is not None:
            check_base(meta, artifact_path, fp, str(language_model_path), key, family=family)
            store = PromptStore(list(templates), fp["hidden_size"])
            for task in templates:
                store.add_frozen(task, tables[task])
            store.to(device).eval()
        info = {
            "family": family,
            "language_model_path": str(language_model_path),
            "resolved_model": resolved.location,
            "fingerprint": fp["sha256"],
            "artifact_path": str(artifact_path) if artifact_path is not None else None,
            "virtual_prompt_style": meta.get("virtual_prompt_style") if meta else None,
        }
        return cls(model, tokenizer, templates, store, info)

    def describe(self) -> dict:
        d = dict(self._info)
        d["virtual_tokens"] = {t: (tpl.total_virtual_tokens if self.store is not None else 0) for t, tpl in self.templates.items()}
        d["tasks"] = sorted(self.templates)
        return d

    def stop_check(self, stop_strings: Sequence[str]):
        """``is_done(row, generated_ids)`` for the greedy loop: a stop string appeared after the leading whitespace
        (public so benchmarks can give another generator exactly this rule)."""
        def is_done(_i: int, generated: list[int]) -> bool:
            if not stop_strings:
                return False
            text = self.tok.decode(generated).lstrip()   # leading whitespace/newlines never stop an answer
            return any(s in text for s in stop_strings)
        return is_done

    @staticmethod
    def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
        """The answer: ``text`` without leading whitespace, cut at the first stop string, stripped."""
        text = text.lstrip()
        for s in stop_strings:
            if s and s in text:
                text = text[: text.index(s)]
        return text.strip()

    def generate(self, records: list[dict], *, tokens_to_generate: int = 32, batch_size: int = 8,
                 use_virtual_prompt: bool = True, stop_strings: tuple[str, ...] = ("\n",), progress: bool = True,
                 share_prefix: bool = False, prompt_lookup_num_tokens: int = 0, prompt_lookup_pass_budget: int | None = None,
                 stats: dict[str, int] | None = None) -> list[str]:
        """Greedy, batched (mixed tasks allowed), left padding with the virtual tokens kept adjacent to the real text
        (pads come first, then [virtual+text] in template order), stops at EOS or a stop string; returns stripped answers
        in input order. A record missing a template input field -> UserError naming the field and record index.
        Stop strings are matched after the answer's leading whitespace, so an answer that starts with a newline
        is not cut to nothing.

        ``share_prefix=True`` (decoder-only models): questions with the same prefix ([BOS] + virtual tokens +
        "Context:" + context) go into one batch and the prefix is prefilled once for all of them; the answers are
        the same as without it (the logits differ only by float rounding). Encoder-decoder models ignore it (logged).

        ``prompt_lookup_num_tokens=k`` (decoder-only models): each decoding pass also verifies up to k tokens copied from the
        question's own prompt (``decoding.greedy_decode``); same greedy answers in fewer passes; drafts are shortened
        so that a pass carries at most ``prompt_lookup_pass_budget`` row-tokens (None: no limit). ``stats`` (a dict)
        accumulates the decoding counts over the batches (forward passes, drafted and accepted tokens)."""
        use_virtual = bool(use_virtual_prompt) and self.store is not None
        if share_prefix and not getattr(self.family, "shares_prefix", False):
            log.info("share_prefix: not supported by the %s family (bidirectional encoder); generating without it", self.family.name)
            share_prefix = False
        if isinstance(prompt_lookup_num_tokens, bool) or not isinstance(prompt_lookup_num_tokens, int) or prompt_lookup_num_tokens < 0:
            raise UserError(f"prompt_lookup_num_tokens: must be an integer >= 0 (draft tokens per decoding pass, 0 = off), got {prompt_lookup_num_tokens!r}")
        budget = prompt_lookup_pass_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise UserError(f"prompt_lookup_pass_budget: must be an integer >= 1 (row-tokens per decoding pass) or None, got {budget!r}")
        decode_kw: dict[str, Any] = {}
        if getattr(self.family, "prompt_lookup", False):
            decode_kw = {"prompt_lookup_num_tokens": prompt_lookup_num_tokens, "pass_budget": budget, "stats": {}}
        elif prompt_lookup_num_tokens:
            log.info("prompt_lookup_num_tokens: not supported by the %s family; decoding one token per pass", self.family.name)
        task_ids = {t: i for i, t in enumerate(self.store.tasks)} if self.store is not None else {t: i for i, t in enumerate(self.templates)}
        rows = []
        prefix_lens: list[int] = []
        budget = self.max_positions - tokens_to_generate if self.max_positions else None
        for i, rec in enumerate(records):
            task = rec.get("taskname")
            if task not in self.templates:
                raise UserError(f"records[{i}]: taskname {task!r} is not one of {sorted(self.templates)}")
            tpl = self.templates[task]
            for name in tpl.input_fields:
                if name not in rec or rec[name] is None:
                    raise UserError(f"records[{i}]: missing field '{name}' required by the template of task '{task}'")
            if share_prefix:
                ids, vidx, plen = D.build_prompt_split(tpl, rec, self.tok, where=f"records[{i}]", use_virtual=use_virtual, max_len=budget)
                prefix_lens.append(plen)
            else:
                ids, vidx = self.family.build_prompt(tpl, rec, self.tok, where=f"records[{i}]", use_virtual=use_virtual, max_len=budget)
            rows.append((ids, vidx, task_ids[task]))
        eos_ids = {self.tok.eos_id} if self.tok.eos_id is not None else set()
        stop = tuple(stop_strings or ())
        out: list[str] = [""] * len(rows)
        if share_prefix:
            chunks = shared_chunks(rows, prefix_lens, batch_size)
        else:
            order = sorted(range(len(rows)), key=lambda k: len(rows[k][0]))  # similar lengths together: less padding
            chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        bar = None
        if progress and chunks:
            try:
                from tqdm import tqdm

                bar = tqdm(total=len(rows), desc="generate", unit="rec")
            except ImportError:
                bar = None
        for chunk in chunks:
            # only decoder-only families take prefix_lens (share_prefix is off for the others, see above)
            shared = {"prefix_lens": [prefix_lens[k] for k in chunk]} if share_prefix and all(prefix_lens[k] > 0 for k in chunk) else {}
            gen = self.family.generate(self.model, self.store if use_virtual else None, [rows[k] for k in chunk],
                                       pad_id=self.tok.pad_id, eos_ids=eos_ids, tokens_to_generate=tokens_to_generate,
                                       is_done=self.stop_check(stop), **shared, **decode_kw)
            if stats is not None and decode_kw:
                for key, value in decode_kw["stats"].items():
                    stats[key] = stats.get(key, 0) + value
            for k, g in zip(chunk, gen):
                out[k] = self.cut_at_stop(self.tok.decode(g), stop)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out


def shared_chunks(rows: Sequence[tuple[list[int], list[int], int]], prefix_lens: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of row indices for shared-prefix generation: rows with the same prefix are kept together (whole
    groups packed into batches of at most ``batch_size``; a larger group is split), groups of similar length
    next to each other (less padding), rows within a group by length."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, ((ids, vidx, task), p) in enumerate(zip(rows, prefix_lens)):
        groups.setdefault((task, tuple(ids[:p]), tuple(vidx[:p])), []).append(k)
    ordered = sorted(groups.values(), key=lambda g: (max(len(rows[k][0]) for k in g), g[0]))
    chunks: list[list[int]] = []
    cur: list[int] = []
    for g in ordered:
        g = sorted(g, key=lambda k: len(rows[k][0]))
        for start in range(0, len(g), batch_size):
            part = g[start:start + batch_size]
            if cur and len(cur) + len(part) > batch_size:
                chunks.append(cur)
                cur = []
            cur = cur + part
    if cur:
        chunks.append(cur)
    return chunks
