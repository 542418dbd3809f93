"""The only trainable state: per-task virtual-token tables (prompt tuning) or prompt encoders (p-tuning).

``PromptStore.table(task)`` is the [total_virtual_tokens, hidden] block whose rows replace the input
embeddings at the task's virtual positions. Tasks restored from an artifact are frozen buffers
(bit-identical after training); new tasks are trainable. After p-tuning the encoder output is frozen
into a plain table (``export_tables``), so inference never needs the encoder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from stages.common.checks import Need
from stages.common.errors import UserError



class PromptEncoder(nn.Module):
    """P-tuning (Liu et al.): trainable input rows -> MLP or bi-LSTM(+MLP head) -> virtual token embeddings."""

    def __init__(self, n: int, hidden: int, encoder_type: str = "mlp", num_layers: int = 2, encoder_hidden: int = 2048,
                 dropout: float = 0.0, init_std: float = 0.023) -> None:
        super().__init__()
        if encoder_type not in ("mlp", "lstm"):
            raise UserError(f"model.p_tuning.encoder_type: '{encoder_type}' is not one of mlp, lstm")
        if num_layers < 1 and encoder_type == "lstm" or num_layers < 2 and encoder_type == "mlp":
            raise UserError(f"model.p_tuning.num_layers: {num_layers} is too small (mlp needs >= 2, lstm >= 1)")
        self.encoder_type = encoder_type
        self.embedding = nn.Parameter(torch.randn(n, hidden) * init_std)
        if encoder_type == "mlp":
            layers: list[nn.Module] = [nn.Linear(hidden, encoder_hidden), nn.ReLU(), nn.Dropout(dropout)]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(encoder_hidden, encoder_hidden), nn.ReLU(), nn.Dropout(dropout)]
            layers.append(nn.Linear(encoder_hidden, hidden))
            self.mlp = nn.Sequential(*layers)
        else:
            self.lstm = nn.LSTM(hidden, encoder_hidden, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                                bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * encoder_hidden, 2 * encoder_hidden), nn.ReLU(), nn.Linear(2 * encoder_hidden, hidden))

    def forward(self) -> torch.Tensor:
        x = self.embedding
        if self.encoder_type == "lstm":
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp(x)


class PromptStore(nn.Module):
    """All tasks' prompt state; task order (``tasks``) defines the task ids used in batches."""

    def __init__(self, tasks: Sequence[str], hidden: int) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.hidden = hidden
        self.style: dict[str, str] = {}   # task -> frozen | prompt-tuning | p-tuning
        self.tables = nn.ParameterDict()  # prompt-tuning, trainable
        self.encoders = nn.ModuleDict()   # p-tuning, trainable
        self.counts: dict[str, int] = {}

    def _key(self, task: str) -> str:
        return f"task{self.tasks.index(task)}"

    def add_frozen(self, task: str, table: torch.Tensor) -> None:
        self.register_buffer(f"frozen_{self._key(task)}", table.detach().clone().to(torch.float32), persistent=True)
        self.style[task], self.counts[task] = "frozen", int(table.shape[0])

    def add_table(self, task: str, table: torch.Tensor) -> None:
        self.tables[self._key(task)] = nn.Parameter(table.detach().clone().to(torch.float32))
        self.style[task], self.counts[task] = "prompt-tuning", int(table.shape[0])

    def add_encoder(self, task: str, encoder: PromptEncoder) -> None:
        self.encoders[self._key(task)] = encoder
        self.style[task], self.counts[task] = "p-tuning", int(encoder.embedding.shape[0])

    def table(self, task: str) -> torch.Tensor:
        style, key = self.style[task], self._key(task)
        if style == "frozen":
            return getattr(self, f"frozen_{key}")
        if style == "prompt-tuning":
            return self.tables[key]
        return self.encoders[key]()

    @torch.no_grad()
    def export_tables(self) -> dict[str, torch.Tensor]:
        """Plain fp32 tables for every task (encoder outputs computed in eval mode, i.e. without dropout)."""
        was = self.training
        self.eval()
        out = {t: self.table(t).detach().to(torch.float32).cpu().contiguous().clone() for t in self.tasks}
        self.train(was)
        return out

    def embed(self, word_embeddings: nn.Module, input_ids: torch.Tensor, virtual_index: torch.Tensor,
              task_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings with the virtual positions replaced by the task's prompt rows."""
        x = word_embeddings(input_ids)
        virt = virtual_index >= 0
        if not bool(virt.any()):
            return x
        x = x.clone()
        for t in task_ids.unique().tolist():
            sel = virt & (task_ids == t).unsqueeze(1)
            if bool(sel.any()):
                table = self.table(self.tasks[t])
                x[sel] = table[virtual_index[sel]].to(x.dtype)
        return x


def _list_get(values: Any, i: int, key: str, n_new: int) -> Any:
    values = list(values) if values is not None else []
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    if len(values) != n_new:
        raise UserError(f"{key}: {len(values)} entries for {n_new} new tasks; give one per new task (or one for all)")
    return values[i]


def _unreadable_as_error(load: Any, p: Path, key: str) -> Any:
    try:
        return load()
    except Exception as exc:   # numpy and safetensors raise their own types for a truncated or foreign file
        raise UserError(f"{key}: {p} is truncated or not a {p.suffix} file ({type(exc).__name__}: {str(exc)[:80]}); "
                        f"write it again") from None


def load_init_file(path: str, n: int, hidden: int, key: str, task: str) -> torch.Tensor:
    p = Path(str(path)).expanduser()
    problem = Need.problem(str(p), key, f"give a .npy or .safetensors file of shape [{n}, {hidden}]")
    if problem:
        raise UserError(problem)
    if p.suffix == ".npy":
        import numpy as np

        arr = torch.from_numpy(_unreadable_as_error(lambda: np.load(p), p, key)).to(torch.float32)
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = _unreadable_as_error(lambda: load_file(str(p)), p, key)
        for name in (f"prompt_table.{task}", "prompt_embeddings", "prompt_table"):
            if name in tensors:
                arr = tensors[name]
                break
        else:
            if len(tensors) != 1:
                raise UserError(f"{key}: {p} holds {sorted(tensors)}; expected one tensor or a 'prompt_table.{task}' key")
            arr = next(iter(tensors.values()))
        arr = arr.to(torch.float32)
    else:
        raise UserError(f"{key}: {p} must be a .npy or .safetensors file")
    if tuple(arr.shape) != (n, hidden):
        raise UserError(f"{key}: {p} has shape {list(arr.shape)} but task '{task}' needs [{n}, {hidden}] (total_virtual_tokens x hidden size)")
    return arr


def table_digest(table: torch.Tensor) -> str:
    """A prompt table by content (a restored task's prompt is part of the run it is extended in)."""
    import hashlib

    return hashlib.sha256(table.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


def init_table(method: str, n: int, embeddings: torch.Tensor, tokenizer: Any, *, seed: int, task: str,
               text: str | None = None, file: str | None = None, std: float | None = None,
               key: str = "model.prompt_tuning") -> torch.Tensor:
    """Initial [n, hidden] prompt table for a new prompt-tuning task."""
    emb = embeddings.detach().to(torch.float32)
    hidden = emb.shape[1]
    g = torch.Generator().manual_seed(int(seed))
    if method == "random":
        scale = float(std) if std is not None else float(emb.std())
        return torch.randn(n, hidden, generator=g) * scale
    if method == "text":
        if not text:
            raise UserError(f"{key}.new_prompt_init_text: empty for task '{task}' whose init method is text; give an init sentence")
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if not ids:
            raise UserError(f"{key}.new_prompt_init_text: '{text}' tokenises to nothing")
        ids = (ids * (n // len(ids) + 1))[:n]   # tile, then truncate to the token count
        return emb[torch.tensor(ids, dtype=torch.long)].clone()
    if method == "vocab":
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pool = torch.tensor([i for i in range(min(emb.shape[0], 5000 + len(special))) if i not in special][:5000] or [0])
        rows = pool[torch.randint(len(pool), (n,), generator=g)]
        return emb[rows].clone()
    if method == "file":
        if not file:
            raise UserError(f"{key}.new_prompt_init_file: missing for task '{task}' whose init method is file")
        return load_init_file(file, n, hidden, f"{key}.new_prompt_init_file", task)
    # the user-facing rule is stages/prompt_learning/config.py's check_tasks; here a caller's programming error
    raise ValueError(f"init_table: unknown init method {method!r}")


def build_new(store: PromptStore, new_tasks: Sequence[str], counts: dict[str, int], style: str, model_cfg: Any,
              embeddings: torch.Tensor, tokenizer: Any, seed: int, key: str = "prompt_learning.model") -> None:
    """Create the trainable state for each new task from ``model.prompt_tuning`` / ``model.p_tuning``; messages name
    ``<key>.prompt_tuning...``."""
    hidden = embeddings.shape[1]
    for i, task in enumerate(new_tasks):
        n = counts[task]
        if style == "prompt-tuning":
            pt = model_cfg.get("prompt_tuning") or {}
            n_new = len(new_tasks)
            method = _list_get(pt.get("new_prompt_init_methods"), i, f"{key}.prompt_tuning.new_prompt_init_methods", n_new) or "random"
            text = _list_get(pt.get("new_prompt_init_text"), i, f"{key}.prompt_tuning.new_prompt_init_text", n_new)
            file = _list_get(pt.get("new_prompt_init_file"), i, f"{key}.prompt_tuning.new_prompt_init_file", n_new)
            table = init_table(method, n, embeddings, tokenizer, seed=seed + i, task=task, text=text, file=file,
                               std=pt.get("init_std"), key=f"{key}.prompt_tuning")
            store.add_table(task, table)
        elif style == "p-tuning":
            pc = model_cfg.get("p_tuning") or {}
            torch.manual_seed(seed + i)
            store.add_encoder(task, PromptEncoder(n, hidden, pc.get("encoder_type", "mlp"), int(pc.get("num_layers", 2)),
                                                  int(pc.get("encoder_hidden", 2048)), float(pc.get("dropout", 0.0)),
                                                  float(pc.get("init_std", 0.023))))
        else:
            raise UserError(f"{key}.virtual_prompt_style: '{style}' is not one of prompt-tuning, p-tuning")


def embed_inputs(model: Any, store: PromptStore | None, input_ids: torch.Tensor, virtual_index: torch.Tensor,
                 task_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of a batch: the frozen model's token embeddings, with the task's prompt rows at the
    virtual positions when a store is given (every family embeds its input this way)."""
    emb = model.get_input_embeddings()
    if store is None:
        return emb(input_ids)
    return store.embed(emb, input_ids, virtual_index, task_ids)
