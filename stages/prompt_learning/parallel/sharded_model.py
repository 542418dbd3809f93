"""``ShardedPromptModel``: one object per process that owns this rank's piece of the frozen model
and runs forward + backward + gradient reduction of the soft prompt for one optimiser step.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from stages.common.errors import UserError

from stages.engine.examples import IGNORE
from stages.engine.base_model import freeze
from .layout import ParallelLayout, check_model_for_layout
from .mesh import build_mesh
from .model import (
    PromptedLlamaStage,
    count_labelled,
    lm_loss_sum,
    position_ids_from_mask,
    split_layers,
)
from .pipeline_parallel import PipelineRunner
from .tensor_parallel import apply_tensor_parallel


class ShardedPromptModel:
    """Soft prompt + frozen Llama over a (pp, dp, tp) mesh.

    Args:
        model: a frozen-to-be ``LlamaForCausalLM`` with the SAME weights on every rank (CPU is fine;
            only this rank's stage is moved to ``device``). It takes ownership: the decoder
            layers of other pipeline stages are replaced by ``nn.Identity`` to free memory, and this
            stage's linears become DTensor shards when tp > 1.
        prompt: the trainable module whose ``forward()`` returns the [n_rows, hidden] prompt table
            (``SoftPrompt`` or a P-tuning encoder). It lives, full and identical, on EVERY rank; only
            pipeline stage 0 uses it in the forward, the gradient is reduced so that every rank holds
            the same gradient and an identical optimiser step keeps every copy equal.
        layout: from :func:`make_layout` / :func:`layout_from_config`.
        mesh: optional prebuilt ``build_mesh(tp, pp, dp)``; built here otherwise. Not used (and no
            process group needed) when ``layout.world_size == 1``.
        device: defaults to ``cuda:LOCAL_RANK`` or CPU.
        pad_to: right-pad every batch to this length (pipeline P2P buffers are per shape; a fixed
            length builds the schedule once). ``None``: one cached schedule per sequence length.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt: nn.Module,
        layout: ParallelLayout,
        *,
        mesh: DeviceMesh | None = None,
        device: torch.device | str | None = None,
        pad_to: int | None = None,
        prefix: str = "prompt_learning.",
    ) -> None:
        # --- everything that can be wrong with the user's config is checked before any collective ---
        check_model_for_layout(model.config, layout, prefix)
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa"):
            raise UserError(
                f"{prefix}prompt_learning.model.language_model_path: attention implementation '{impl}' cannot take the 4-D "
                f"causal+padding mask of the parallel path; load the model with attn_implementation='sdpa'"
            )
        self.layout = layout
        self.pad_to = pad_to
        if device is None:
            from .mesh import default_device

            device = default_device()
        self.device = torch.device(device)

        if layout.world_size > 1 or dist.is_initialized():
            if not dist.is_initialized():
                raise RuntimeError("the default process group is not initialised; call init_distributed() first")
            if dist.get_world_size() != layout.world_size:
                raise UserError(
                    f"{prefix}model: the layout needs tp x pp x dp = {layout.tp}x{layout.pp}x{layout.dp} = "
                    f"{layout.world_size} processes but {dist.get_world_size()} were started; fix prompt_learning.trainer.devices / "
                    f"prompt_learning.trainer.num_nodes or the parallel sizes"
                )
            self.mesh = mesh if mesh is not None else build_mesh(layout.tp, layout.pp, layout.dp)
            self.pp_rank = self.mesh.get_local_rank("pp")
            self.dp_rank = self.mesh.get_local_rank("dp")
            self.tp_rank = self.mesh.get_local_rank("tp")
            self._pp_group = self.mesh["pp"].get_group()
            self._dp_group = self.mesh["dp"].get_group()
        else:
            self.mesh = None
            self.pp_rank = self.dp_rank = self.tp_rank = 0
            self._pp_group = self._dp_group = None

        # --- this rank's stage ---
        freeze(model)   # also eval()
        n_layers = model.config.num_hidden_layers
        ranges = split_layers(n_layers, layout.pp)
        mine = ranges[self.pp_rank]
        self.is_first = self.pp_rank == 0
        self.is_last = self.pp_rank == layout.pp - 1
        stage = PromptedLlamaStage(model, prompt, mine, is_first=self.is_first, is_last=self.is_last)
        if layout.pp > 1:
            for i in range(n_layers):
                if i not in mine:
                    model.model.layers[i] = nn.Identity()
        stage.to(self.device)
        if layout.tp > 1:
            apply_tensor_parallel(stage, self.mesh["tp"])
        self.stage = stage
        self.prompt = prompt.to(self.device)
        with torch.no_grad():
            table = self.prompt()
        if table.dim() != 2 or table.shape[1] != model.config.hidden_size:
            raise ValueError(f"prompt() returned shape {tuple(table.shape)}, expected [n_rows, {model.config.hidden_size}]")
        self.n_prompt_rows = int(table.shape[0])
        if self.mesh is not None and layout.world_size > 1:
            # like DDP at wrap time: every rank starts from global rank 0's prompt
            with torch.no_grad():
                for t in list(self.prompt.parameters()) + list(self.prompt.buffers()):
                    dist.broadcast(t.data, src=0)
        self._denominator = torch.ones((), device=self.device)
        self._runner: PipelineRunner | None = None
        if layout.pp > 1:
            self._runner = PipelineRunner(
                stage, self.pp_rank, layout.pp, self.device, self._pp_group,
                layout.n_microbatches, self._micro_loss, layout.schedule,
            )

    # ------------------------------------------------------------------ data
    @property
    def data_parallel_rank(self) -> int:
        """Shard index for the sampler (``DistributedSampler(num_replicas=dp, rank=this)``)."""
        return self.dp_rank

    @property
    def data_parallel_size(self) -> int:
        return self.layout.dp

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters (the prompt module's) -- give these to the optimiser on every rank."""
        return (p for p in self.prompt.parameters() if p.requires_grad)

    def _prepare(self, batch: Mapping[str, torch.Tensor]):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch["labels"]
        if mask is None:
            mask = torch.ones_like(ids)
        if ids.numel() and int(ids.min()) < -self.n_prompt_rows:
            raise ValueError(
                f"input_ids reference virtual token {-int(ids.min()) - 1} but the prompt table has "
                f"{self.n_prompt_rows} rows (virtual token k is written as id -(k+1))"
            )
        rows = self.layout.rows_per_dp_rank
        if ids.shape[0] != rows:
            raise ValueError(
                f"batch has {ids.shape[0]} rows; each data-parallel rank must get global_batch_size / dp = {rows} "
                f"rows per step (micro batching is done here)"
            )
        if self.pad_to is not None:
            s = ids.shape[1]
            if s > self.pad_to:
                raise ValueError(f"batch sequence length {s} is longer than pad_to={self.pad_to}")
            if s < self.pad_to:
                extra = self.pad_to - s
                ids = torch.nn.functional.pad(ids, (0, extra), value=0)
                mask = torch.nn.functional.pad(mask, (0, extra), value=0)
                labels = torch.nn.functional.pad(labels, (0, extra), value=IGNORE)
        pos = batch.get("position_ids")
        if pos is None:
            pos = position_ids_from_mask(mask)
        elif self.pad_to is not None and pos.shape[1] < ids.shape[1]:
            pos = torch.nn.functional.pad(pos, (0, ids.shape[1] - pos.shape[1]), value=0)
        dev = self.device
        return ids.to(dev), mask.to(dev), pos.to(dev), labels.to(dev)

    def _micro_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return lm_loss_sum(logits, labels) / self._denominator

    def _set_denominator(self, labels: torch.Tensor) -> None:
        n = count_labelled(labels).to(torch.float64)
        if self._dp_group is not None and self.layout.dp > 1:
            dist.all_reduce(n, group=self._dp_group)
        self._denominator = n.clamp_min(1).to(torch.float32)

    # ------------------------------------------------------------------ steps
    def _run(self, batch: Mapping[str, torch.Tensor], train: bool) -> torch.Tensor:
        ids, mask, pos, labels = self._prepare(batch)
        self._set_denominator(labels)
        if self._runner is not None:
            return self._runner.run(ids, mask, pos, labels, train=train)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        n_mb = self.layout.n_microbatches
        chunks = zip(ids.chunk(n_mb), mask.chunk(n_mb), pos.chunk(n_mb), labels.chunk(n_mb))
        with torch.set_grad_enabled(train):
            for c_ids, c_mask, c_pos, c_labels in chunks:
                loss = self._micro_loss(self.stage(c_ids, attention_mask=c_mask, position_ids=c_pos), c_labels)
                if train:
                    loss.backward()
                total += loss.detach().float()
        return total

    def _reduce(self, loss: torch.Tensor, grads: list[torch.Tensor] | None) -> torch.Tensor:
        """SUM the loss (and the flat prompt gradient) over pp (only stage 0 / the last stage hold
        non-zero values) and over dp. One all-reduce per mesh dim."""
        parts = [loss.reshape(1)] + ([g.reshape(-1) for g in grads] if grads else [])
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        if self.layout.pp > 1:
            dist.all_reduce(flat, group=self._pp_group)
        if self.layout.dp > 1:
            dist.all_reduce(flat, group=self._dp_group)
        if grads:
            offset = 1
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        return flat[0].clone()

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Forward + backward of this rank's ``global_batch_size / dp`` rows and the gradient
        reduction. Afterwards every rank holds the full, identical gradient of the global token-mean
        loss in ``prompt`` parameters' ``.grad``; returns that loss (detached, same on every rank).

        Call ``optimizer.zero_grad()`` before (gradients accumulate like in plain PyTorch) and
        ``optimizer.step()`` after, on every rank.
        """
        self.prompt.train()
        params = list(self.parameters())
        # gradients already held (accumulation over several train_step calls) are already reduced:
        # put them aside so only this step's local gradients go through the all-reduce
        held = [p.grad for p in params]
        for p in params:
            # stages > 0 do not use the prompt and contribute zeros to the pp sum
            p.grad = None if self.is_first else torch.zeros_like(p)
        loss = self._run(batch, train=True)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        loss = self._reduce(loss, [p.grad for p in params])
        for p, g in zip(params, held):
            if g is not None:
                p.grad.add_(g)
        return loss

    def eval_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Global token-mean loss of the batch, no gradients; same value on every rank."""
        self.prompt.eval()
        with torch.no_grad():
            loss = self._run(batch, train=False)
        return self._reduce(loss, None)

    # ------------------------------------------------------------------ artifact
    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain, full CPU tensors (no DTensor, no rank dependence): save from any rank, load under
        any layout (TP=2 trained -> TP=1 evaluated and the reverse)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.prompt.state_dict().items()}

    def load_prompt_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.prompt.load_state_dict({k: v.to(self.device) for k, v in state.items()})

    @torch.no_grad()
    def prompt_table(self) -> torch.Tensor:
        """The [n_rows, hidden] table the model sees (P-tuning: the encoder's output), on CPU."""
        return self.prompt().detach().float().cpu()


def check_prompt_in_sync(model: ShardedPromptModel, atol: float = 0.0) -> float:
    """Max difference of the prompt parameters between this rank and global rank 0 (debug helper)."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.prompt.parameters()])
    ref = flat.clone()
    if dist.is_initialized():
        dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max().item() if flat.numel() else 0.0
    if diff > atol:
        raise AssertionError(f"prompt differs from rank 0 by {diff}")
    return diff
