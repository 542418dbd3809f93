"""Stage entry: tune virtual prompts for a frozen Hugging Face LM from the resolved ``prompt_learning`` config.

Steps: templates -> base model (frozen, fp32) -> restored tasks (frozen) + new tasks (trainable) -> examples ->
PyTorch Lightning fit (prompt state only in checkpoints, resumable) -> artifact + exports + loss_curve.png.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from stages.common.errors import UserError
from stages.common.io import write_json
from stages.host_memory import reuse_host_memory
from stages.prompt_learning.config import check_batching_flags, check_tasks
from stages.prompt_learning.layer_compile import check_setting as check_compile
from stages.prompt_learning.layer_compile import compile_layers

log = logging.getLogger("promptlaunch.prompt_learning")


def _cfg(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node


def _files(x: Any) -> list[str]:
    if x is None:
        return []
    return [str(x)] if isinstance(x, str) else [str(v) for v in x]


def batch_plan(cfg: DictConfig) -> tuple[int, int, int]:
    """(micro_batch_size, accumulate_grad_batches, data_parallel_size) from global/micro batch sizes."""
    layout = batch_plan_layout(cfg)   # TP x PP x DP sizes checked (one-line UserErrors); torch-free
    return layout.micro_batch_size, layout.n_microbatches, layout.dp


def world_size_of(cfg: DictConfig) -> int:
    return int(cfg.trainer.get("devices", 1) or 1) * int(cfg.trainer.get("num_nodes", 1) or 1)


def batch_plan_layout(cfg: DictConfig) -> Any:
    """The validated TP x PP x DP layout (``parallel.layout.ParallelLayout``) of the stage config."""
    from .parallel.layout import layout_from_config

    return layout_from_config(cfg.model, world_size_of(cfg), prefix="")


def train(cfg: DictConfig, callbacks: Sequence[Any] | None = None) -> dict[str, Any]:
    """Run prompt learning; returns a summary dict (also written to <log_dir>/prompt_learning_summary.json)."""
    t_start = time.monotonic()
    from stages.engine import collate as C
    from stages.engine import dataset as DS
    from stages.engine import examples as D


    import warnings

    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")   # the frozen base model, on purpose
    warnings.filterwarnings("ignore", message=r".*srun. command is available.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    # the batch sampler skips the batches already consumed (fault.py, module.ResumableBatchSampler)
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")   # resuming
    from .fault import FaultTolerance, install_preemption_handler

    preempt_flag = install_preemption_handler()   # first: from here on the preemption signal cannot kill the process
    tr_cfg = cfg.get("trainer") or {}
    reuse = tr_cfg.get("reuse_host_memory", True)
    if not isinstance(reuse, bool):
        raise UserError(f"trainer.reuse_host_memory: must be true or false, got {reuse!r}")
    reuse_host_memory(reuse)
    compile_on = check_compile(tr_cfg.get("compile", False), cpu=str(tr_cfg.get("accelerator", "cpu")) == "cpu")
    m = cfg.model
    seed = int(m.get("seed", 1234))
    tasks = check_tasks(m)   # the launcher's own check, again on the config this job was handed
    style, templates_all, new_tasks, existing = tasks.style, tasks.templates, tasks.new, tasks.existing
    mbs, accumulate, dp = batch_plan(cfg)
    # data errors first: they are cheap to find and should not wait for a model load
    d = m.data
    known = {t: templates_all[t] for t in new_tasks + existing if t in templates_all}
    val_files = _files(d.get("validation_ds"))
    train_records = DS.read_jsonl(_files(d.get("train_ds")), known, "model.data.train_ds")
    val_records = DS.read_jsonl(val_files, known, "model.data.validation_ds") if val_files else []

    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from stages.engine.artifact import base_info, check_base, load_artifact, save_artifact
    from stages.engine.export import input_spec
    from stages.engine.family import family_for
    from stages.engine.base_model import fingerprint, resolve
    from .module import PromptLearningModule, ResumableBatchSampler
    from stages.engine.prompts import PromptStore, build_new
    from .report import write_loss_curve

    pl.seed_everything(seed, workers=True, verbose=False)

    # ---- base model --------------------------------------------------------------------------
    resolved = resolve(m.get("language_model_path"), "model.language_model_path")
    from stages.engine.base_model import load_tokenizer

    tokenizer = load_tokenizer(resolved.location)
    parallel = None
    if world_size_of(cfg) > 1 or batch_plan_layout(cfg).is_model_parallel:   # TP/PP/DP: parallel/wiring.py
        from .parallel import wiring as parallel
        from .parallel.checks import precheck
        precheck(cfg, batch_plan_layout(cfg), resolved.location, style)
        if compile_on:
            raise UserError("trainer.compile: the tensor/pipeline/data-parallel engine runs its layers uncompiled; "
                            "set trainer.compile=false (or train in one process)")
    model = load_base_model(resolved.location, m.get("attn_implementation"))
    family = family_for(model.config, tokenizer)   # "gpt" (causal LM) or "t5" (encoder-decoder)
    if compile_on and family.name != "gpt":
        raise UserError(f"trainer.compile: supported for decoder-only models; {type(model).__name__} is an "
                        f"encoder-decoder ({family.name}); set trainer.compile=false")
    fp = fingerprint(model)
    base = base_info(resolved.given, resolved.location, model, fp)
    info = D.TokenizerInfo(tokenizer)
    emb_before = model.get_input_embeddings().weight.detach().clone() if cfg.get("_check_frozen") else None

    # ---- tasks: restored (frozen) + new (trainable) ------------------------------------------
    templates = {}
    restored: dict[str, Any] = {}
    if existing:
        restore = m.get("restore_path")
        meta, art_templates, tables = load_artifact(restore, "model.restore_path")
        check_base(meta, restore, fp, resolved.given, family=family.name)
        for t in existing:
            if t not in tables:
                raise UserError(f"model.existing_tasks: '{t}' is not in the artifact {restore} (has {sorted(tables)})")
            tpl = templates_all.get(t, art_templates[t])
            if tpl.total_virtual_tokens != tables[t].shape[0]:
                raise UserError(
                    f"model.task_templates[{t}].total_virtual_tokens: {tpl.total_virtual_tokens}, but the restored prompt has "
                    f"{tables[t].shape[0]} rows; keep the template of an existing task unchanged"
                )
            templates[t] = tpl
            restored[t] = tables[t]
    for t in new_tasks:
        templates[t] = templates_all[t]
    tasks = existing + new_tasks
    store = PromptStore(tasks, fp["hidden_size"])
    for t in existing:
        store.add_frozen(t, restored[t])
    build_new(store, new_tasks, {t: templates[t].total_virtual_tokens for t in new_tasks}, style, m,
              model.get_input_embeddings().weight, tokenizer, seed)
    n_trainable = sum(p.numel() for p in store.parameters() if p.requires_grad)
    log.info("tasks: existing (frozen) %s, new (trainable) %s; %s trainable parameters; base model %s (%s) frozen",
             existing, new_tasks, f"{n_trainable:,}", resolved.given, fp["sha256"])

    # ---- data ------------------------------------------------------------------------------------
    share, bucket = _batching_options(d, family, parallel is not None)
    if compile_on:
        if share:
            log.warning("trainer.compile: with model.data.share_prefix=true every batch carries its prefix's KV cache "
                        "and runs the eager layers; set model.data.share_prefix=false to train compiled")
        compile_layers(model)
    max_len = int(d.get("max_seq_length", 1024))
    common = dict(max_seq_length=max_len, min_seq_length=int(d.get("min_seq_length", 1) or 1),
                  add_eos=bool(d.get("add_eos", True)), seed=seed)
    train_ex, train_stats = DS.build_dataset(_files(d.get("train_ds")), templates, info, key="model.data.train_ds",
                                            max_examples=d.get("max_train_examples"), records=train_records,
                                            builder=family.build_example, group_sample=share, **common)
    val_ex, val_stats = ([], None)
    if val_files:
        val_ex, val_stats = DS.build_dataset(val_files, templates, info, key="model.data.validation_ds",
                                            max_examples=d.get("max_val_examples"), records=val_records, sample=False,
                                            builder=family.build_example, **common)
    task_ids = {t: i for i, t in enumerate(tasks)}

    def collate(batch: list[D.Example]) -> dict[str, Any]:
        if share:   # each distinct prefix once (family.loss takes both kinds of batch)
            return C.collate_shared(batch, task_ids, info.pad_id)
        return family.collate(batch, task_ids, info.pad_id)

    # ---- trainer --------------------------------------------------------------------------------
    tr, em = cfg.trainer, cfg.exp_manager
    log_dir = Path(str(em.get("explicit_log_dir") or Path(str(cfg.run.results_dir)) / "results"))
    log_dir.mkdir(parents=True, exist_ok=True)
    nw = int(d.get("num_workers", 0) or 0)
    ft = FaultTolerance(log_dir, layout={"train_examples": len(train_ex), "global_batch_size": mbs * accumulate * dp,
                                         "shuffle": bool(d.get("shuffle", True)), "seed": seed,
                                         **_batching_layout(share, bucket)},
                        every_n_train_steps=(_cfg(em.get("checkpoint_callback_params")) or {}).get("every_n_train_steps"),
                        flag=preempt_flag)
    if parallel is not None:   # several processes or TP x PP > 1: global token-mean loss, manual optimisation
        module, trainer, train_dl, val_dl = parallel.setup_parallel(
            layout=batch_plan_layout(cfg), model=model, store=store, family=family, optim=_cfg(m.optim), train_ex=train_ex,
            val_ex=val_ex, collate=collate, trainer_kwargs=_trainer_kwargs(tr, em, log_dir, 1, callbacks, bool(val_ex), ft),
            micro_batch_size=mbs, shuffle=bool(d.get("shuffle", True)), seed=seed, num_workers=nw)
    else:
        module = PromptLearningModule(model, store, family, _cfg(m.optim))
        trainer = pl.Trainer(**_trainer_kwargs(tr, em, log_dir, accumulate, callbacks, bool(val_ex), ft))
        rank, world = trainer.global_rank, trainer.world_size
        if share or bucket:
            from .batching import BucketBatchSampler

            groups = C.prefix_groups(train_ex) if share else None
            sampler = BucketBatchSampler(len(train_ex), mbs, shuffle=bool(d.get("shuffle", True)), seed=seed,
                                         epoch_fn=lambda: trainer.current_epoch, rank=rank, world=world,
                                         lengths=[len(e.input_ids) for e in train_ex] if bucket else None, groups=groups)
            if groups is not None:
                log.info("share_prefix: %d training examples in %d prefix groups (%.1f per group)", len(train_ex),
                         len(groups), len(train_ex) / max(1, len(groups)))
        else:
            sampler = ResumableBatchSampler(len(train_ex), mbs, shuffle=bool(d.get("shuffle", True)), seed=seed,
                                            epoch_fn=lambda: trainer.current_epoch, rank=rank, world=world)
        module.sampler = sampler
        train_dl = DataLoader(train_ex, batch_sampler=sampler, collate_fn=collate, num_workers=nw,
                              generator=torch.Generator().manual_seed(seed))   # not the global RNG (fault.py)
        val_dl = None
        if val_ex:
            shard = val_ex[rank::world]
            val_dl = DataLoader(shard, batch_size=mbs, shuffle=False, collate_fn=collate, num_workers=nw,
                                generator=torch.Generator().manual_seed(seed))
    # last.ckpt checked (falls back to last.prev.ckpt if corrupt), or None: start from scratch
    ckpt_path = ft.resume_path(module, trainer.global_rank, bool(em.get("resume_if_exists", False)))
    log.info("training: micro batch %d x accumulate %d x data-parallel %d = global batch %d; %d train / %d val examples",
             mbs, accumulate, dp, mbs * accumulate * dp, len(train_ex), len(val_ex))
    if val_dl is not None and ckpt_path is None and bool(m.get("validate_before_training", True)):
        trainer.validate(module, val_dl, verbose=False)   # step-0 point of the val curve (the initial prompt)
    try:
        trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl, ckpt_path=ckpt_path)
    except RuntimeError as exc:
        if ckpt_path and ("state_dict" in str(exc) or "size mismatch" in str(exc) or "optimizer" in str(exc).lower()):
            raise UserError(f"{ckpt_path}: checkpoint does not match this config ({str(exc)[:160]}); delete it or set exp_manager.resume_if_exists=false") from None
        raise
    if emb_before is not None:
        emb = model.get_input_embeddings().weight
        emb = emb.full_tensor() if hasattr(emb, "full_tensor") else emb   # a DTensor shard under TP
        assert torch.equal(emb_before, emb.cpu()), "base model changed during training"

    # ---- artifact, exports, report (rank 0) ------------------------------------------------------
    summary: dict[str, Any] = {}
    if trainer.global_rank == 0:
        hist = module.history
        val_losses = [v for _, v in hist["val"]]
        training = {
            "steps": int(trainer.global_step),
            "final_val_loss": val_losses[-1] if val_losses else None,
            "first_val_loss": val_losses[0] if val_losses else None,
            "final_train_loss": hist["train"][-1][1] if hist["train"] else None,
            "global_batch_size": mbs * accumulate * dp,
            "train_examples": train_stats.as_dict(),
            "val_examples": val_stats.as_dict() if val_stats else None,
            "seed": seed,
            "lr": float(m.optim.lr),
            "existing_tasks": existing,
            "new_tasks": new_tasks,
        }
        checked = [r for r, _ in val_records + train_records]   # the PEFT input check runs on the run's own records
        specs = {t: input_spec(family, templates[t], checked, info) for t in tasks}
        art = save_artifact(str(m.artifact_path), tables=store.export_tables(), templates=templates, style=style, base=base,
                            add_eos=common["add_eos"], max_seq_length=max_len, training=training, family=family.name,
                            export_specs=specs)
        write_loss_curve(log_dir / "loss_curve.png", hist, title=f"{cfg.run.get('name', 'prompt_learning')}: {', '.join(new_tasks)}")
        write_json(log_dir / "loss_history.json", hist)
        summary = {**training, "artifact_path": str(art), "seconds": round(time.monotonic() - t_start, 1),
                   "loss_curve": str(log_dir / "loss_curve.png")}
        write_json(log_dir / "prompt_learning_summary.json", summary)
        log.info("artifact written to %s; val_loss %s -> %s over %d steps (%.0fs)", art, training["first_val_loss"],
                 training["final_val_loss"], training["steps"], summary["seconds"])
    return summary


def _batching_options(d: Any, family: Any, parallel: bool) -> tuple[bool, bool]:
    """(share_prefix, length_bucketing) from ``model.data``. Where they cannot apply they are switched off with a
    logged line rather than failing (the CPU default turns them on): the TP/PP/DP engine builds its batches with
    its own sampler, and an encoder-decoder model's bidirectional encoder makes a prefix depend on what follows."""
    share, bucket = check_batching_flags({"data": d})
    if parallel and (share or bucket):
        log.warning("model.data.share_prefix/length_bucketing ignored: the tensor/pipeline/data-parallel engine uses plain batches")
        return False, False
    if share and not getattr(family, "shares_prefix", False):
        log.warning("model.data.share_prefix=true ignored: the %s family (encoder-decoder) cannot share prefixes", family.name)
        share = False
    return share, bucket


def _batching_layout(share: bool, bucket: bool) -> dict[str, Any]:
    """The sampler layout key of checkpoints (absent for plain batching, so older checkpoints still resume)."""
    kind = "+".join(k for k, on in (("length_bucketing", bucket), ("share_prefix", share)) if on)
    return {"batching": kind} if kind else {}


def load_base_model(location: str, attn_implementation: str | None) -> Any:
    """The frozen fp32 base model as this stage loads it (also used by bench/ so both compare the same model)."""
    import torch
    import transformers

    from stages.engine.base_model import auto_class_for, freeze, load_model

    auto_class = auto_class_for(location)   # AutoModelForCausalLM, or AutoModelForSeq2SeqLM for T5/mT5
    if not attn_implementation:
        return load_model(location, auto_class)
    try:
        model = getattr(transformers, auto_class).from_pretrained(location, dtype=torch.float32,
                                                                  attn_implementation=str(attn_implementation))
    except Exception as exc:
        raise UserError(f"model.attn_implementation={attn_implementation}: cannot load the model with it ({str(exc)[:160]}); use eager or sdpa") from None
    return freeze(model)


def _trainer_kwargs(tr: DictConfig, em: DictConfig, log_dir: Path, accumulate: int, callbacks: Sequence[Any] | None,
                    has_val: bool, fault: Any = None) -> dict[str, Any]:
    """Lightning Trainer arguments; ``fault`` (fault.FaultTolerance) adds atomic checkpoints, RNG/data-position
    state, preemption handling and an atomically written metrics.csv."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    loggers: list[Any] = []
    if em.get("create_csv_logger", True):
        loggers.append(fault.logger(str(log_dir)) if fault is not None else CSVLogger(save_dir=str(log_dir), name="", version="csv"))
    if em.get("create_tensorboard_logger", False):
        try:
            import tensorboard  # noqa: F401
            from pytorch_lightning.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(log_dir), name="", version="tensorboard"))
        except ImportError:
            log.warning("exp_manager.create_tensorboard_logger=true but tensorboard is not installed; skipping it")
    if em.get("create_wandb_logger", False):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("exp_manager.create_wandb_logger=true but wandb is not installed; `pip install wandb` or set it to false") from None
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(WandbLogger(save_dir=str(log_dir), **(_cfg(em.get("wandb_logger_kwargs")) or {})))
    cp = _cfg(em.get("checkpoint_callback_params")) or {}
    monitor = cp.get("monitor", "val_loss") if has_val else None
    ckpt_cb = ModelCheckpoint(
        dirpath=str(log_dir / "checkpoints"),
        filename="step={step}-val_loss={val_loss:.4f}" if monitor else "step={step}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=cp.get("mode", "min"),
        save_top_k=int(cp.get("save_top_k", 1)) if monitor else 1,
        save_last=fault is None,     # with fault tolerance, fault.LastCheckpoint writes last.ckpt (every_n_train_steps)
        every_n_train_steps=None if fault is not None else cp.get("every_n_train_steps"),
        save_weights_only=False,
        enable_version_counter=False,   # always last.ckpt (never last-v1.ckpt), the file a rerun resumes from
    )
    precision = str(tr.get("precision", "32"))
    if str(tr.get("accelerator", "cpu")) == "cpu" and "16" in precision:
        log.warning("trainer.precision=%s on CPU is emulated and very slow; use 32", precision)
    cfg_acc = int(tr.get("accumulate_grad_batches", 1) or 1)
    if cfg_acc not in (1, accumulate):
        log.warning("trainer.accumulate_grad_batches=%d ignored: global/micro batch sizes give %d", cfg_acc, accumulate)
    val_every = tr.get("val_check_interval", 1.0)
    kwargs = dict(
        accelerator=str(tr.get("accelerator", "cpu")),
        devices=tr.get("devices", 1),
        num_nodes=int(tr.get("num_nodes", 1) or 1),
        precision=precision,
        max_steps=int(tr.get("max_steps", -1) if tr.get("max_steps") is not None else -1),
        max_epochs=int(tr.get("max_epochs", -1) if tr.get("max_epochs") is not None else -1),
        val_check_interval=val_every,
        check_val_every_n_epoch=None if isinstance(val_every, int) else 1,
        limit_val_batches=tr.get("limit_val_batches", 1.0) if has_val else 0,
        gradient_clip_val=tr.get("gradient_clip_val"),
        accumulate_grad_batches=accumulate,
        log_every_n_steps=int(tr.get("log_every_n_steps", 10)),
        enable_progress_bar=bool(tr.get("enable_progress_bar", True)),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        logger=loggers or False,
        callbacks=[ckpt_cb, *(fault.callbacks() if fault is not None else []), *(callbacks or [])],
        default_root_dir=str(log_dir),
        use_distributed_sampler=False,
        deterministic=False,
    )
    if fault is not None:
        kwargs["plugins"] = fault.plugins()
    world = int(tr.get("devices", 1) or 1) * int(tr.get("num_nodes", 1) or 1)
    if world > 1:
        kwargs["strategy"] = "ddp_find_unused_parameters_true"
    return kwargs
