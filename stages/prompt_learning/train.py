"""Stage entry: tune virtual prompts for a frozen Hugging Face LM from the resolved ``prompt_learning`` config.

The training recipe, in the manner of torchtune's single-device recipes: :class:`PromptLearningRecipe` sets one run
up a concern at a time (process, config, data records, base model, prompts, examples, optimiser, fault tolerance,
trainer, data loaders, resume), then fits it with PyTorch Lightning (prompt state only in checkpoints, resumable)
and writes the artifact, exports and loss_curve.png. :func:`train` is what ``run.py``, the tests and ``bench/`` call.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from stages.common.errors import UserError
from stages.common.io import write_json
from stages.engine.host_memory import reuse_host_memory
from stages.engine.prompts import table_digest
from stages.prompt_learning.config import STAGE, check_config
from stages.engine.layer_compile import compile_layers

from .trainer_args import plain, trainer_kwargs

log = logging.getLogger("promptlaunch.prompt_learning")

EXPECTED_WARNINGS = (
    r".*module\(s\) in eval mode.*",   # the frozen base model, on purpose
    r".*srun. command is available.*",
    r".*LeafSpec.*",
    # the batch sampler skips the batches already consumed (fault/, engine/samplers.ResumableBatchSampler)
    r".*resuming from a checkpoint that ended before the epoch ended.*",
    r".*Checkpoint directory .* exists and is not empty.*",   # resuming
)


def train(cfg: DictConfig, callbacks: Sequence[Any] | None = None) -> dict[str, Any]:
    """Run prompt learning; returns a summary dict (also written to <log_dir>/prompt_learning_summary.json)."""
    return PromptLearningRecipe(cfg, callbacks).run()


class PromptLearningRecipe:
    """One prompt-learning run. :meth:`setup` calls one method per concern, in the order the run needs them:
    each reads what the earlier ones left on ``self``, the config check (torch-free, no side effects) comes first,
    the preemption handler before any work. The recipe holds its pieces (model, prompt store, LightningModule,
    ``pl.Trainer``, ``FaultTolerance``) rather than inheriting from any of them."""

    def __init__(self, cfg: DictConfig, callbacks: Sequence[Any] | None = None) -> None:
        self.t_start = time.monotonic()
        self.cfg = cfg
        self.callbacks = callbacks

    def run(self) -> dict[str, Any]:
        """Set up, fit, write the artifact and report; the summary (empty on ranks other than 0)."""
        self.setup()
        self.fit()
        return self.write_outputs()

    def setup(self) -> None:
        self.check_config()
        self.setup_process()
        self.read_records()
        self.setup_model()
        self.setup_prompts()
        self.setup_precision()
        self.setup_data()
        self.setup_optimizer()
        self.setup_fault_tolerance()
        self.setup_trainer()
        self.setup_dataloaders()
        self.choose_resume()

    # ---- setup, one concern each --------------------------------------------------------------------------
    def setup_process(self) -> None:
        """Process-wide settings, before any work: the warnings this stage expects are silenced, the preemption
        signal from here on only sets a flag (it cannot kill the process halfway through a step), freed host
        memory is kept for reuse or not (``trainer.reuse_host_memory``)."""
        for pattern in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        from .fault.preemption import install_preemption_handler

        self.preempt_flag = install_preemption_handler()
        reuse_host_memory(self.checked.trainer.reuse_host_memory, f"{STAGE}.trainer.reuse_host_memory")

    def check_config(self) -> None:
        """The stage's config rules (``config.check_config``, the function the launcher calls too), again on the
        config this job was handed, with the inputs and the machine: one-line UserErrors, before any work."""
        self.checked = checked = check_config(self.cfg)
        checked.stage.check_reads_exist()
        for here in checked.stage.here:
            here()
        self.seed = int(self.cfg.model.get("seed", 1234))
        self.tasks, self.layout, self.compile_on = checked.tasks, checked.layout, checked.compile
        self.batching_flags = (checked.share_prefix, checked.length_bucketing)

    def read_records(self) -> None:
        """The JSONL records, checked against the task templates: data errors are cheap to find and should not
        wait for a model load."""
        from stages.engine.dataset import read_jsonl

        d, t = self.cfg.model.data, self.tasks
        known = {name: t.templates[name] for name in t.new + t.existing if name in t.templates}
        self.val_files = _files(d.get("validation_ds"))
        self.train_records = read_jsonl(_files(d.get("train_ds")), known, "prompt_learning.model.data.train_ds")
        self.val_records = read_jsonl(self.val_files, known, "prompt_learning.model.data.validation_ds") if self.val_files else []

    def setup_model(self) -> None:
        """The frozen fp32 base model, its tokenizer and family. Several processes or TP x PP > 1 take the
        parallel engine (``parallel/``), whose checks read only the model's config.json, before the weights load."""
        import pytorch_lightning as pl

        from stages.engine.artifact import base_info
        from stages.engine.base_model import fingerprint, load_model, load_tokenizer, resolve
        from stages.engine.examples import TokenizerInfo
        from stages.engine.family import family_for

        from .parallel.checks import precheck, use_parallel_path

        pl.seed_everything(self.seed, workers=True, verbose=False)
        m = self.cfg.model
        self.resolved = resolve(m.get("language_model_path"), "prompt_learning.model.language_model_path")
        self.tokenizer = load_tokenizer(self.resolved.location)
        self.parallel = use_parallel_path(self.layout)
        if self.parallel:
            precheck(self.layout, self.resolved.location)
        self.model = model = load_model(self.resolved.location, key=f"{STAGE}.model.language_model_path",
                                        attn_implementation=m.get("attn_implementation"),
                                        attn_key=f"{STAGE}.model.attn_implementation")
        self.family = family_for(model.config, self.tokenizer)   # "gpt" (causal LM) or "t5" (encoder-decoder)
        if self.compile_on and self.family.name != "gpt":
            raise UserError(f"{STAGE}.trainer.compile: supported for decoder-only models; {type(model).__name__} is an "
                            f"encoder-decoder ({self.family.name}); set {STAGE}.trainer.compile=false")
        self.fingerprint = fingerprint(model)
        self.base = base_info(self.resolved.given, self.resolved.location, model, self.fingerprint)
        self.info = TokenizerInfo(self.tokenizer)
        self.emb_before = model.get_input_embeddings().weight.detach().clone() if self.cfg.get("_check_frozen") else None

    def setup_prompts(self) -> None:
        """The prompt store: existing tasks restored from ``prompt_learning.model.restore_path`` (frozen; the artifact must be of
        this base model and keep each task's row count), new tasks initialised and trainable."""
        from stages.engine.artifact import check_base, load_artifact
        from stages.engine.prompts import PromptStore, build_new

        m, t = self.cfg.model, self.tasks
        templates = {}
        restored: dict[str, Any] = {}
        if t.existing:
            restore = m.get("restore_path")
            meta, art_templates, tables = load_artifact(restore, "prompt_learning.model.restore_path")
            check_base(meta, restore, self.fingerprint, self.resolved.given, family=self.family.name)
            for name in t.existing:
                if name not in tables:
                    raise UserError(f"prompt_learning.model.existing_tasks: '{name}' is not in the artifact {restore} (has {sorted(tables)})")
                tpl = t.templates.get(name, art_templates[name])
                if tpl.total_virtual_tokens != tables[name].shape[0]:
                    raise UserError(
                        f"prompt_learning.model.task_templates[{name}].total_virtual_tokens: {tpl.total_virtual_tokens}, but the restored "
                        f"prompt has {tables[name].shape[0]} rows; keep the template of an existing task unchanged"
                    )
                templates[name] = tpl
                restored[name] = tables[name]
        self.restored_digest = {name: table_digest(restored[name]) for name in t.existing}
        for name in t.new:
            templates[name] = t.templates[name]
        self.templates = templates
        self.task_names = t.existing + t.new
        self.store = store = PromptStore(self.task_names, self.fingerprint["hidden_size"])
        for name in t.existing:
            store.add_frozen(name, restored[name])
        build_new(store, t.new, {name: templates[name].total_virtual_tokens for name in t.new}, t.style, m,
                  self.model.get_input_embeddings().weight, self.tokenizer, self.seed)
        n_trainable = sum(p.numel() for p in store.parameters() if p.requires_grad)
        log.info("tasks: existing (frozen) %s, new (trainable) %s; %s trainable parameters; base model %s (%s) frozen",
                 t.existing, t.new, f"{n_trainable:,}", self.resolved.given, self.fingerprint["sha256"])

    def setup_precision(self) -> None:
        """``trainer.precision`` decided on this machine (``stages/common/precision.py``). ``bf16-true`` casts the
        frozen model once, after its fingerprint and the prompts' initial rows were taken from the fp32 weights; the
        prompt store stays fp32. Lightning is then handed ``32-true`` (its own bf16-true would cast the prompt too)."""
        from stages.common import precision

        t = self.checked.trainer
        self.precision = precision.resolve(t.precision, t.accelerator, f"{STAGE}.trainer.precision")
        log.info("%s", precision.explain(t.precision, self.precision, t.accelerator))
        if self.precision == "bf16-true":
            import torch

            self.model.to(torch.bfloat16)

    def setup_data(self) -> None:
        """Token examples and the collate function, with the batching options that apply to this model and engine.
        The layers are compiled here because whether batches carry a shared prefix's KV cache is decided here."""
        from stages.engine.collate import collate_shared
        from stages.engine.dataset import build_dataset

        from .batching import batching_options

        d = self.cfg.model.data
        self.share, self.bucket = share, bucket = batching_options(self.batching_flags, self.family, self.parallel)
        if self.compile_on:
            if share:
                log.warning("prompt_learning.trainer.compile: with prompt_learning.model.data.share_prefix=true every batch carries its prefix's KV "
                            "cache and runs the eager layers; set prompt_learning.model.data.share_prefix=false to train compiled")
            compile_layers(self.model)
        self.max_len = int(d.get("max_seq_length", 1024))
        # an encoder-decoder with learned positions (NeMo's Megatron T5: 512) cannot read a longer encoder input;
        # NeMo's T5 prompt learning defaults max_seq_length to the model's max_position_embeddings
        positions = getattr(self.model.config, "max_position_embeddings", None) if self.family.name == "t5" else None
        if positions and self.max_len > int(positions):
            raise UserError(f"{STAGE}.model.data.max_seq_length: {self.max_len} is longer than the {positions} positions "
                            f"of {self.resolved.given} (learned absolute positions); set it to at most {positions}")
        self.add_eos = bool(d.get("add_eos", True))
        common = dict(max_seq_length=self.max_len, min_seq_length=int(d.get("min_seq_length", 1) or 1),
                      add_eos=self.add_eos, seed=self.seed, keep_answer=bool(d.get("truncate_keep_answer", False)))
        builder = self.family.build_example
        self.train_ex, self.train_stats = build_dataset(
            _files(d.get("train_ds")), self.templates, self.info, key="prompt_learning.model.data.train_ds",
            max_examples=d.get("max_train_examples"), records=self.train_records, builder=builder, group_sample=share,
            **common)
        for name in self.tasks.new:   # a new task with no examples would have no gradient at all
            if not self.train_stats.per_task.get(name):
                raise UserError(f"prompt_learning.model.data.train_ds: no training examples of the new task '{name}' "
                                f"(examples per task: {dict(self.train_stats.per_task)}); add records with taskname "
                                f"'{name}' or remove it from prompt_learning.model.new_tasks")
        self.val_ex, self.val_stats = ([], None)
        if self.val_files:
            self.val_ex, self.val_stats = build_dataset(
                self.val_files, self.templates, self.info, key="prompt_learning.model.data.validation_ds",
                max_examples=d.get("max_val_examples"), records=self.val_records, sample=False, builder=builder, **common)
        task_ids = {name: i for i, name in enumerate(self.task_names)}
        family, pad_id = self.family, self.info.pad_id

        def collate(batch: list[Any]) -> dict[str, Any]:
            if share:   # each distinct prefix once (family.loss takes both kinds of batch)
                return collate_shared(batch, task_ids, pad_id)
            return family.collate(batch, task_ids, pad_id)

        self.collate = collate

    def setup_optimizer(self) -> None:
        """The LightningModule, which owns the optimiser and LR schedule of ``prompt_learning.model.optim`` (``configure_optimizers``
        in ``module.py``): automatic optimisation in one process; on the parallel path manual optimisation around
        the TP/PP/DP engine, global token-mean loss, the module clipping gradients itself."""
        optim = plain(self.cfg.model.optim)
        if self.parallel:
            from .parallel.wiring import parallel_module

            self.module = parallel_module(layout=self.layout, model=self.model, store=self.store, family=self.family,
                                          optim=optim, examples=[*self.train_ex, *self.val_ex],
                                          clip_val=self.cfg.trainer.get("gradient_clip_val"),
                                          micro_batch_size=self.layout.micro_batch_size)
        else:
            from .module import PromptLearningModule

            self.module = PromptLearningModule(self.model, self.store, self.family, optim)

    def setup_fault_tolerance(self) -> None:
        """Atomic checkpoints, RNG/data state, ``last.ckpt`` and preemption (``fault/``). The run identity recorded in
        every checkpoint is what a resumed run must share: the settings, the base model and data by content, and
        the batches (``fault/identity.py``)."""
        from .batching import batching_kind
        from .identity import ignored_keys, run_identity
        from .fault.tolerance import FaultTolerance

        cfg = self.cfg
        em, d = cfg.exp_manager, cfg.model.data
        self.log_dir = Path(str(em.get("explicit_log_dir") or Path(str(cfg.run.results_dir)) / "results"))
        if not bool(em.get("resume_if_exists", False)):
            from .fault.set_aside import set_aside

            set_aside(self.log_dir, [Path(str(cfg.model.artifact_path))])
        self.log_dir.mkdir(parents=True, exist_ok=True)
        derived = {"train_examples": len(self.train_ex), "batching": batching_kind(self.share, self.bucket),
                   "restored_prompts": self.restored_digest,
                   "trainer.precision": self.precision}   # as resolved: `auto` decides per machine
        self.identity = run_identity(cfg, style=self.tasks.style, base_fingerprint=self.fingerprint["weights_sha256"],
                                     data_files={"model.data.train_ds": _files(d.get("train_ds")),
                                                 "model.data.validation_ds": self.val_files},
                                     derived=derived)
        self.ft = FaultTolerance(self.log_dir, identity=self.identity, flag=self.preempt_flag,
                                 every_n_train_steps=(plain(em.get("checkpoint_callback_params")) or {}).get("every_n_train_steps"),
                                 ignore=ignored_keys(em.get("resume_ignore_changes")))

    def setup_trainer(self) -> None:
        """``pl.Trainer`` with loggers, the top-k checkpoint and fault-tolerance callbacks (``trainer_args.py``);
        the parallel path brings its own strategy and accumulates inside the engine."""
        cfg = self.cfg
        accumulate = 1 if self.parallel else self.layout.n_microbatches
        from .trackers import tracker_loggers

        self.trackers = tracker_loggers(self.checked.trackers, self.log_dir, plain(cfg))
        kwargs = trainer_kwargs(cfg.trainer, cfg.exp_manager, self.log_dir, accumulate, self.callbacks, bool(self.val_ex),
                                self.ft, self.trackers)
        kwargs["precision"] = "32-true" if self.precision == "bf16-true" else self.precision
        if self.parallel:
            from .parallel.wiring import parallel_trainer

            self.trainer = parallel_trainer(kwargs, self.layout)
        else:
            import pytorch_lightning as pl

            self.trainer = pl.Trainer(**kwargs)

    def setup_dataloaders(self) -> None:
        """Samplers and DataLoaders. After the trainer: a sampler shards by the trainer's rank, reshuffles by its
        epoch and, on resume, skips the batches already consumed (``engine/samplers.ResumableBatchSampler``)."""
        import torch
        from torch.utils.data import DataLoader

        d = self.cfg.model.data
        shuffle, seed, nw = bool(d.get("shuffle", True)), self.seed, int(d.get("num_workers", 0) or 0)
        trainer, train_ex, val_ex, mbs = self.trainer, self.train_ex, self.val_ex, self.layout.micro_batch_size
        if self.parallel:
            from .parallel.wiring import parallel_dataloaders

            self.train_dl, self.val_dl = parallel_dataloaders(self.module, trainer, self.layout, train_ex=train_ex,
                                                              val_ex=val_ex, collate=self.collate, shuffle=shuffle,
                                                              seed=seed, num_workers=nw)
            return
        from stages.engine.samplers import ResumableBatchSampler

        rank, world = trainer.global_rank, trainer.world_size
        if self.share or self.bucket:
            from stages.engine.collate import prefix_groups

            from stages.engine.samplers import BucketBatchSampler

            groups = prefix_groups(train_ex) if self.share else None
            sampler = BucketBatchSampler(len(train_ex), mbs, shuffle=shuffle, seed=seed,
                                         epoch_fn=lambda: trainer.current_epoch, rank=rank, world=world,
                                         lengths=[len(e.input_ids) for e in train_ex] if self.bucket else None,
                                         groups=groups)
            if groups is not None:
                log.info("share_prefix: %d training examples in %d prefix groups (%.1f per group)", len(train_ex),
                         len(groups), len(train_ex) / max(1, len(groups)))
        else:
            sampler = ResumableBatchSampler(len(train_ex), mbs, shuffle=shuffle, seed=seed,
                                            epoch_fn=lambda: trainer.current_epoch, rank=rank, world=world)
        self.module.sampler = sampler
        self.train_dl = DataLoader(train_ex, batch_sampler=sampler, collate_fn=self.collate, num_workers=nw,
                                   generator=torch.Generator().manual_seed(seed))   # not the global RNG (fault/)
        self.val_dl = None
        if val_ex:
            self.val_dl = DataLoader(val_ex[rank::world], batch_size=mbs, shuffle=False, collate_fn=self.collate,
                                     num_workers=nw, generator=torch.Generator().manual_seed(seed))

    def choose_resume(self) -> None:
        """The checkpoint ``fit`` resumes from: last.ckpt checked (last.prev.ckpt if it is corrupt), or None to
        start from scratch (``fault/resume.py``); needs the module's prompt shapes and the trainer's rank."""
        self.ckpt_path = self.ft.resume_path(self.module, self.trainer.global_rank,
                                             bool(self.cfg.exp_manager.get("resume_if_exists", False)))

    # ---- the run -----------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Validate once first (the step-0 point of the val curve: the initial prompt) unless resuming, then fit."""
        lay, trainer, module = self.layout, self.trainer, self.module
        log.info("training: micro batch %d x accumulate %d x data-parallel %d = global batch %d; %d train / %d val "
                 "examples", lay.micro_batch_size, lay.n_microbatches, lay.dp, lay.global_batch_size, len(self.train_ex),
                 len(self.val_ex))
        if self.val_dl is not None and self.ckpt_path is None and bool(self.cfg.model.get("validate_before_training", True)):
            trainer.validate(module, self.val_dl, verbose=False)
        try:
            trainer.fit(module, train_dataloaders=self.train_dl, val_dataloaders=self.val_dl, ckpt_path=self.ckpt_path)
        except RuntimeError as exc:
            ckpt_path = self.ckpt_path
            if ckpt_path and ("state_dict" in str(exc) or "size mismatch" in str(exc) or "optimizer" in str(exc).lower()):
                raise UserError(f"{ckpt_path}: checkpoint does not match this config ({str(exc)[:160]}); delete it or set prompt_learning.exp_manager.resume_if_exists=false") from None
            raise
        if self.emb_before is not None:
            import torch

            emb = self.model.get_input_embeddings().weight
            emb = emb.full_tensor() if hasattr(emb, "full_tensor") else emb   # a DTensor shard under TP
            assert torch.equal(self.emb_before, emb.cpu()), "base model changed during training"

    def write_outputs(self) -> dict[str, Any]:
        """Rank 0: the artifact (prompt tables, templates, base model fingerprint, exports), loss curve, loss
        history and summary; the summary is returned (empty on other ranks)."""
        if self.trainer.global_rank != 0:
            return {}
        from stages.engine.artifact import save_artifact
        from stages.engine.export import input_spec

        from .identity import digest

        from .report import write_loss_curve

        cfg, m, t, log_dir = self.cfg, self.cfg.model, self.tasks, self.log_dir
        hist = self.module.history
        val_losses = [v for _, v in hist["val"]]
        training = {
            "steps": int(self.trainer.global_step),
            "final_val_loss": val_losses[-1] if val_losses else None,
            "first_val_loss": val_losses[0] if val_losses else None,
            "final_train_loss": hist["train"][-1][1] if hist["train"] else None,
            "global_batch_size": self.layout.global_batch_size,
            "train_examples": self.train_stats.as_dict(),
            "val_examples": self.val_stats.as_dict() if self.val_stats else None,
            "seed": self.seed,
            "lr": float(m.optim.lr),
            "existing_tasks": t.existing,
            "new_tasks": t.new,
            "identity_digest": digest(self.identity),
            "identity": self.identity,
            "resumed_with_changes": self.ft.resumed.changed,
        }
        checked = [r for r, _ in self.val_records + self.train_records]   # the PEFT input check runs on the run's own records
        specs = {name: input_spec(self.family, self.templates[name], checked, self.info) for name in self.task_names}
        art = save_artifact(str(m.artifact_path), tables=self.store.export_tables(), templates=self.templates,
                            style=t.style, base=self.base, add_eos=self.add_eos, max_seq_length=self.max_len,
                            training=training, family=self.family.name, export_specs=specs)
        if m.get("nemo_path"):
            _copy_nemo_export(art, t.new[0], str(m.nemo_path))
        write_loss_curve(log_dir / "loss_curve.png", hist,
                         title=f"{cfg.run.get('name', 'prompt_learning')}: {', '.join(t.new)}")
        write_json(log_dir / "loss_history.json", hist)
        summary = {**training, "artifact_path": str(art), "seconds": round(time.monotonic() - self.t_start, 1),
                   "loss_curve": str(log_dir / "loss_curve.png")}
        write_json(log_dir / "prompt_learning_summary.json", summary)
        if self.trackers:
            from .trackers import publish

            publish(self.trackers, art, summary, log_dir, str(cfg.run.get("name", "prompt_learning")))
        log.info("artifact written to %s; val_loss %s -> %s over %d steps (%.0fs)", art, training["first_val_loss"],
                 training["final_val_loss"], training["steps"], summary["seconds"])
        return summary


def _copy_nemo_export(artifact: Any, task: str, nemo_path: str) -> None:
    """``model.nemo_path`` (NeMo's key): the task's NeMo 1.20+ prompt file, where NeMo users look for it."""
    import shutil

    from stages.common.io import atomic_path

    with atomic_path(nemo_path, suffix=".nemo") as tmp:
        shutil.copyfile(Path(str(artifact)) / "export" / "nemo" / f"{task}.nemo", tmp)
    log.info("model.nemo_path: %s (the NeMo 1.20+ prompt file of %s; other layouts in %s/export/nemo)", nemo_path,
             task, artifact)


def _files(x: Any) -> list[str]:
    if x is None:
        return []
    return [str(x)] if isinstance(x, str) else [str(v) for v in x]
