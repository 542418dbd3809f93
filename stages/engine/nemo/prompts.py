"""NeMo 1.x prompt-learning results (``megatron_gpt_prompt.nemo``) in and out, without NeMo.

Import (:func:`load`) gives what :func:`stages.engine.artifact.load_artifact` gives for our own folder: ``(meta,
templates, tables)``, tables fp32 ``[total_virtual_tokens, hidden]``. The container is any ``.nemo`` the base-model
reader opens (tar, gzip or not, or the unpacked folder; :mod:`.archive`); the state is ``model_weights.ckpt`` (or
``mp_rank_XX/`` / ``tp_rank_XX_pp_rank_000/``: the prompt state lives on the first pipeline stage only). Two
generations of the state, read from NeMo's sources:

* NeMo <= 1.16 (``nemo/collections/nlp/modules/common/prompt_table.py``, ``PromptTable``;
  ``megatron_base_prompt_learning_model.py``: ``state_dict`` / ``load_state_dict``):
  ``{'prompt_table': {'prompt_table.<task>.prompt_embeddings.weight': [T, H], 'prompt_table.<task>.indices': [T]},
  ['prompt_encoder': {...}]}``, or (older files, which ``load_state_dict`` still reads) the same keys flat at the top
  level under ``prompt_table.``. Every task in the table is imported (``existing_tasks``: NeMo moves the p-tuned
  tasks into the table and rewrites the config as ``virtual_prompt_style: inference`` when training ends). A 1.16
  ``prompt_encoder`` is ignored: its forward takes the task name's word embeddings of the base model.
* NeMo >= 1.17 (``nemo/collections/nlp/modules/common/prompt_encoder.py``, ``PromptEncoder.state_dict``):
  ``{'prompt_table': InferenceTable state, 'embeddings': {'weight': [T, H]}, + 'mlp_head' | 'lstm_head' and
  'mlp_head' | 'tpmlp'}``. The file holds ONE encoder, built for ``new_tasks[0]``, whose output NeMo's
  ``embed_input`` inserts for every task (``MegatronGPTPromptLearningModel.embed_input`` ignores the task id), so
  every task of ``new_tasks`` gets the same table. The cached ``prompt_table`` is filled by an eval-mode forward
  and zeroed by a train-mode one, so it may be stale: the table is recomputed from the encoder weights.

The recomputation follows ``PromptEncoder._forward`` of NeMo v1.23.0 (unchanged in substance since v1.17.0),
``nemo/collections/nlp/modules/common/prompt_encoder.py``, in eval mode (no dropout), fp32:
``x = embedding.weight`` (``embedding(indices)``, ``indices = arange(T)``), then

* ``embedding``: ``x``;
* ``mlp``: ``nn.Sequential(Linear, ReLU, ..., Linear)`` on ``x`` (keys ``mlp_head.<i>.weight``);
* ``lstm``: the bidirectional, batch-first ``nn.LSTM`` ``lstm_head`` on ``x[None]``, then ``mlp_head``
  (``Linear(2h, 2h), ReLU, Linear(2h, H)``). Note: NeMo's own ``load_state_dict`` calls
  ``self.lstm_head.state_dict(...)`` instead of ``load_state_dict`` there, so a NeMo restore keeps a random LSTM; we
  use the saved one, i.e. the table NeMo's encoder produced when the file was saved;
* ``tpmlp`` (``TPMLP.forward``): ``y = x @ first.weight.T`` (a column-parallel linear with ``skip_bias_add``),
  ``h = fused_bias_gelu(y, first.bias)`` = ``z * 0.5 * (1 + tanh(0.79788456 * z * (1 + 0.044715 * z * z)))`` with
  ``z = first.bias + y`` (``fused_bias_gelu.py``: ``bias_gelu``), ``out = h @ second.weight.T + second.bias``.
  Tensor-parallel shards are merged first (``first`` on dim 0, ``second.weight`` on dim 1); with TP > 1 NeMo sums
  the row-parallel partial products across ranks, so such a table matches NeMo's up to float rounding only.

Hidden size: the table's width (a prompt ``.nemo`` records no base-model fingerprint; ``artifact.check_base``
compares the hidden size and the model family only).

Export (:func:`write`): one task per file, ``model_config.yaml`` + ``model_weights.ckpt`` in a plain tar with
``./`` members, as ``SaveRestoreConnector`` writes it, in one of three layouts:

* ``"1.20"`` (NeMo 1.20-1.23): ``encoder_type: embedding``, ``{'prompt_table': {'prompt_table.<task>.
  prompt_embeddings.weight': W}, 'embeddings': {'weight': W}}``, ``new_tasks`` and ``existing_tasks`` ``[task]``
  (NeMo builds the encoder from ``new_tasks[0]``); the table's ``indices`` buffer is not persistent there;
* ``"1.17"`` (NeMo 1.17-1.19): the same plus ``prompt_table.<task>.indices`` (persistent in those versions, and
  ``InferenceTable.load_state_dict`` is strict);
* ``"1.16"`` (NeMo <= 1.16): ``virtual_prompt_style: inference``, ``existing_tasks: [task]``, ``new_tasks: []``,
  ``{'prompt_table': {'prompt_table.<task>.prompt_embeddings.weight': W, 'prompt_table.<task>.indices': arange}}``.

Not checked against NeMo itself (no NeMo in this environment): that ``megatron_gpt_prompt_learning_eval.py`` accepts
these configs as written; the key names and the strictness above were read from the tagged sources.
"""
from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Any

from stages.common.errors import UserError
from stages.engine.template import TaskTemplate, parse_templates

from . import weights as W
from .archive import CONFIG, NemoArchive

LAYOUTS = ("1.20", "1.17", "1.16")
_TABLE_KEY = re.compile(r"^prompt_table\.(.+)\.prompt_embeddings\.weight$")
_TARGETS = {"gpt": "nemo.collections.nlp.models.language_modeling.megatron_gpt_prompt_learning_model."
                   "MegatronGPTPromptLearningModel",
            "t5": "nemo.collections.nlp.models.language_modeling.megatron_t5_prompt_learning_model."
                  "MegatronT5PromptLearningModel"}


def load(path: str | Path, key: str) -> tuple[dict[str, Any], dict[str, TaskTemplate], dict[str, Any]]:
    """(meta, templates, tables) of a NeMo prompt-learning ``.nemo``; every problem one UserError line naming ``key``."""
    p = Path(str(path)).expanduser()
    archive = NemoArchive(p, key)
    where = archive.where()
    with archive.opened():
        if not archive.has(CONFIG):
            raise UserError(f"{where}: has no {CONFIG}; not a NeMo prompt-learning .nemo nor a prompt artifact "
                            "folder (artifact.json)")
        cfg = archive.model_config()
        if not cfg.get("task_templates"):
            raise UserError(f"{where}: {CONFIG} has no task_templates; a NeMo base model is not a prompt-learning "
                            "result: point it at the .nemo that NeMo's prompt learning saved (nemo_path)")
        state = _state(archive, where)
    family = "t5" if "T5" in str(cfg.get("target", "")) else "gpt"
    all_templates = parse_templates([dict(t) for t in cfg["task_templates"]], f"{key}/{CONFIG}:task_templates")
    if "embeddings" in state:
        layout, encoder = ">=1.17", str((cfg.get("p_tuning") or {}).get("encoder_type", "tpmlp")).lower()
        table = _encoder_table(state, encoder, where)
        tasks = [str(t) for t in cfg.get("new_tasks") or []]
        if not tasks:
            raise UserError(f"{where}: {CONFIG} new_tasks is empty; NeMo >= 1.17 builds its one prompt encoder for "
                            "new_tasks[0], so the file does not say which task its table belongs to")
        tables = {t: table.clone() for t in tasks}
    else:
        layout, encoder = "<=1.16", None
        tables = _table_entries(state, where)
    for task, table in tables.items():
        if task not in all_templates:
            raise UserError(f"{where}: task '{task}' has a prompt table but no entry in {CONFIG} task_templates")
        want = all_templates[task].total_virtual_tokens
        if table.shape[0] != want:
            raise UserError(f"{where}: task '{task}': the prompt table has {table.shape[0]} rows but its template "
                            f"says total_virtual_tokens: {want}")
    widths = {int(t.shape[1]) for t in tables.values()}
    if len(widths) != 1:
        raise UserError(f"{where}: the prompt tables have different widths {sorted(widths)}; the file is damaged")
    hidden = widths.pop()
    templates = {t: all_templates[t] for t in tables}
    meta = {
        "format": "nemo",
        "nemo_layout": layout,
        "nemo_version": cfg.get("nemo_version"),
        "family": family,
        "virtual_prompt_style": str(cfg.get("virtual_prompt_style", "p-tuning")),
        "encoder_type": encoder,
        "tasks": {t: {"template": templates[t].to_dict(), "total_virtual_tokens": int(tables[t].shape[0])}
                  for t in tables},
        "base_model": {"language_model_path": cfg.get("language_model_path"), "hidden_size": hidden},
        "existing_tasks": list(cfg.get("existing_tasks") or []),
        "new_tasks": list(cfg.get("new_tasks") or []),
    }
    return meta, templates, tables


def _state(archive: NemoArchive, where: str) -> dict[str, Any]:
    """The prompt state of the first pipeline stage, tensor-parallel ranks merged (only ``tpmlp`` is sharded)."""
    import torch

    grid = W.weight_files(archive)
    if grid[(0, 0)] == W.dist_ckpt.PREFIX:
        raise UserError(f"{where}: holds a distributed checkpoint ({W.dist_ckpt.PREFIX}), which NeMo's prompt "
                        "learning never writes; not a prompt-learning .nemo")
    ranks = [archive.state_dict(grid[(tp, 0)], where) for tp in range(1 + max(t for t, _ in grid))]
    state = ranks[0]
    if len(ranks) > 1 and isinstance(state.get("tpmlp"), dict):
        parts = [r.get("tpmlp") or {} for r in ranks]
        names = ("first.weight", "first.bias", "second.weight", "second.bias")
        if any(n not in p for p in parts for n in names):
            raise UserError(f"{where}: a tensor-parallel rank lacks part of tpmlp ({', '.join(names)}); the shards "
                            "do not belong together")
        merged = dict(state["tpmlp"])
        for name in ("first.weight", "first.bias"):
            merged[name] = torch.cat([p[name] for p in parts], dim=0)
        merged["second.weight"] = torch.cat([p["second.weight"] for p in parts], dim=1)
        state = {**state, "tpmlp": merged}
    if "embeddings" not in state and "prompt_table" not in state and \
            not any(str(k).startswith("prompt_table.") for k in state):
        shown = ", ".join(sorted(str(k) for k in state)[:4]) or "nothing"
        raise UserError(f"{where}: {grid[(0, 0)]} holds no prompt state (no prompt_table or embeddings; it holds "
                        f"{shown}); not a NeMo prompt-learning .nemo")
    return state


def _tensor(value: Any, name: str, where: str) -> Any:
    import torch

    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
        raise UserError(f"{where}: '{name}' is not a 2-D float tensor; the .nemo is damaged")
    return value.to(torch.float32)


def _table_entries(state: dict[str, Any], where: str) -> dict[str, Any]:
    """NeMo <= 1.16: the tasks of ``PromptTable`` (nested under ``prompt_table``, or flat in older files)."""
    nested = state.get("prompt_table")
    if not isinstance(nested, dict):
        nested = {k[len("prompt_table."):]: v for k, v in state.items() if str(k).startswith("prompt_table.")}
    tables = {}
    for name, value in nested.items():
        m = _TABLE_KEY.match(str(name))
        if m:
            tables[m.group(1)] = _tensor(value, f"prompt_table.{name}", where)
    if not tables:
        raise UserError(f"{where}: its prompt_table holds no prompt_table.<task>.prompt_embeddings.weight; no "
                        "prompt state to import (a p-tuning checkpoint saved before training ended?)")
    return tables


def _sub(state: dict[str, Any], part: str, name: str, where: str) -> Any:
    group = state.get(part)
    if not isinstance(group, dict) or name not in group:
        raise UserError(f"{where}: the prompt encoder state has no {part}.{name}; the .nemo is damaged or its "
                        "p_tuning.encoder_type does not match its weights")
    return group[name]


def _mlp(state: dict[str, Any], x: Any, where: str) -> Any:
    """``mlp_head``: ``nn.Sequential(Linear, ReLU, Linear, ...)``: the Linears at the even indices."""
    import torch
    import torch.nn.functional as F

    head = state.get("mlp_head")
    idx = sorted({int(k.split(".")[0]) for k in (head or {}) if k.split(".")[0].isdigit()})
    if not idx or idx != list(range(0, 2 * len(idx), 2)):
        raise UserError(f"{where}: the prompt encoder state has no usable mlp_head (keys "
                        f"{sorted(head or {})[:6]}); the .nemo is damaged")
    for n, i in enumerate(idx):
        x = F.linear(x, _sub(state, "mlp_head", f"{i}.weight", where).to(torch.float32),
                     _sub(state, "mlp_head", f"{i}.bias", where).to(torch.float32))
        if n < len(idx) - 1:
            x = torch.relu(x)
    return x


def _encoder_table(state: dict[str, Any], encoder: str, where: str) -> Any:
    """The table ``PromptEncoder._forward`` produces (NeMo v1.23.0 ``prompt_encoder.py``, see the module docstring)."""
    import torch

    emb = _tensor(_sub(state, "embeddings", "weight", where), "embeddings.weight", where)
    x = emb.unsqueeze(0)   # [1, T, H], as NeMo's forward runs it (batch of one)
    with torch.no_grad():
        if encoder == "embedding":
            out = x
        elif encoder == "mlp":
            out = _mlp(state, x, where)
        elif encoder == "lstm":
            lstm_state = state.get("lstm_head")
            if not isinstance(lstm_state, dict) or "weight_ih_l0" not in lstm_state:
                raise UserError(f"{where}: the prompt encoder state has no lstm_head.weight_ih_l0; the .nemo is "
                                "damaged or its p_tuning.encoder_type does not match its weights")
            layers = 1 + max(int(m.group(1)) for k in lstm_state if (m := re.match(r"weight_ih_l(\d+)$", k)))
            hidden = int(lstm_state["weight_hh_l0"].shape[1])
            lstm = torch.nn.LSTM(input_size=x.shape[2], hidden_size=hidden, num_layers=layers, bidirectional=True,
                                 batch_first=True)
            try:
                lstm.load_state_dict({k: v.to(torch.float32) for k, v in lstm_state.items()})
            except RuntimeError as exc:
                raise UserError(f"{where}: lstm_head does not fit a bidirectional LSTM "
                                f"({str(exc).splitlines()[0][:120]}); the .nemo is damaged") from None
            out = _mlp(state, lstm.eval()(x)[0], where)
        elif encoder == "tpmlp":
            f32 = lambda n: _sub(state, "tpmlp", n, where).to(torch.float32)  # noqa: E731
            z = f32("first.bias") + torch.matmul(x, f32("first.weight").t())
            h = z * 0.5 * (1.0 + torch.tanh(0.79788456 * z * (1 + 0.044715 * z * z)))
            out = torch.matmul(h, f32("second.weight").t()) + f32("second.bias")
        else:
            raise UserError(f"{where}: model_config.yaml p_tuning.encoder_type: {encoder} is not one of NeMo's "
                            "embedding, mlp, lstm, tpmlp")
    if out.shape != x.shape:
        raise UserError(f"{where}: the {encoder} prompt encoder gives {tuple(out.shape[1:])}, not the embeddings' "
                        f"{tuple(emb.shape)}; the .nemo is damaged")
    return out.squeeze(0).contiguous()


def nemo_state(task: str, table: Any, layout: str) -> dict[str, Any]:
    """The ``model_weights.ckpt`` state dict of one task in ``layout`` (see the module docstring)."""
    from collections import OrderedDict

    import torch

    w = table.detach().to(torch.float32).contiguous()
    entries = OrderedDict([(f"prompt_table.{task}.prompt_embeddings.weight", w.clone())])
    if layout in ("1.17", "1.16"):
        entries[f"prompt_table.{task}.indices"] = torch.arange(w.shape[0], dtype=torch.long)
    if layout == "1.16":
        return {"prompt_table": entries}
    return {"prompt_table": entries, "embeddings": OrderedDict([("weight", w.clone())])}


def nemo_config(task: str, template: TaskTemplate, layout: str, language_model_path: str | None, family: str,
                hidden: int) -> dict[str, Any]:
    """``model_config.yaml`` of one exported task, the keys NeMo's prompt-learning model reads at restore."""
    cfg: dict[str, Any] = {
        "target": _TARGETS.get(family, _TARGETS["gpt"]),
        "nemo_path": f"{task}.nemo",
        "language_model_path": language_model_path,
        "task_templates": [template.to_dict()],
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "precision": 32,
    }
    if layout == "1.16":
        cfg.update({"virtual_prompt_style": "inference", "existing_tasks": [task], "new_tasks": []})
    else:
        cfg.update({"virtual_prompt_style": "p-tuning", "existing_tasks": [task], "new_tasks": [task],
                    "p_tuning": {"encoder_type": "embedding", "num_layers": 2, "dropout": 0.0,
                                 "encoder_hidden": hidden // 2, "init_std": 0.023}})
    return cfg


def write(target: Path, task: str, table: Any, template: TaskTemplate, layout: str,
          language_model_path: str | None, family: str = "gpt") -> Path:
    """Write one task as a NeMo prompt-learning ``.nemo`` at ``target``, atomically (a plain tar, ``./`` members)."""
    import torch
    import yaml

    from stages.common.io import atomic_path

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    buf = io.BytesIO()
    torch.save(nemo_state(task, table, layout), buf)
    cfg = nemo_config(task, template, layout, language_model_path, family, int(table.shape[1]))
    members = {CONFIG: yaml.safe_dump(cfg, sort_keys=False).encode("utf-8"), "model_weights.ckpt": buf.getvalue()}
    with atomic_path(target, suffix=".nemo", size=sum(len(v) for v in members.values())) as tmp:
        with tarfile.open(tmp, "w:") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return target
