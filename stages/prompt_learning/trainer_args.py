"""The ``pl.Trainer`` arguments of a prompt-learning run: loggers, the top-k checkpoint callback, the
fault-tolerance callbacks and plugins, and the trainer knobs of ``trainer.*`` (the trainer concern of the recipe in
``train.py``, kept apart so the recipe reads as its steps)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf


log = logging.getLogger("promptlaunch.prompt_learning")


def plain(node: Any) -> Any:
    """A config node as plain Python containers (resolved); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node


def world_size_of(tr: Any) -> int:
    """``prompt_learning.trainer.devices x prompt_learning.trainer.num_nodes`` of the ``trainer`` config block."""
    return int(tr.get("devices", 1) or 1) * int(tr.get("num_nodes", 1) or 1)


def trainer_kwargs(tr: DictConfig, em: DictConfig, log_dir: Path, accumulate: int, callbacks: Sequence[Any] | None,
                   has_val: bool, fault: Any, trackers: Sequence[Any] = ()) -> dict[str, Any]:
    """Lightning Trainer arguments; ``fault`` (``fault.FaultTolerance``) adds atomic checkpoints, RNG/data-position
    state, preemption handling and an atomically written metrics.csv; ``trackers`` are the W&B / MLflow loggers
    (``trackers.tracker_loggers``)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    loggers: list[Any] = []
    if em.get("create_csv_logger", True):
        loggers.append(fault.logger(str(log_dir)))
    if em.get("create_tensorboard_logger", False):
        try:
            import tensorboard  # noqa: F401
            from pytorch_lightning.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(log_dir), name="", version="tensorboard"))
        except ImportError:
            log.warning("prompt_learning.exp_manager.create_tensorboard_logger=true but tensorboard is not installed; skipping it")
    loggers += trackers
    cp = plain(em.get("checkpoint_callback_params")) or {}
    monitor = cp.get("monitor", "val_loss") if has_val else None
    ckpt_cb = ModelCheckpoint(
        dirpath=str(log_dir / "checkpoints"),
        filename="step={step}-val_loss={val_loss:.4f}" if monitor else "step={step}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=cp.get("mode", "min"),
        save_top_k=int(cp.get("save_top_k", 1)) if monitor else 1,
        save_last=False,             # fault.LastCheckpoint writes last.ckpt (every_n_train_steps)
        every_n_train_steps=None,
        save_weights_only=False,
        enable_version_counter=False,   # always last.ckpt (never last-v1.ckpt), the file a rerun resumes from
    )
    cfg_acc = int(tr.get("accumulate_grad_batches", 1) or 1)
    if cfg_acc not in (1, accumulate):
        log.warning("prompt_learning.trainer.accumulate_grad_batches=%d ignored: global/micro batch sizes give %d", cfg_acc, accumulate)
    val_every = tr.get("val_check_interval", 1.0)
    kwargs = dict(
        accelerator=str(tr.get("accelerator", "cpu")),
        devices=tr.get("devices", 1),
        num_nodes=int(tr.get("num_nodes", 1) or 1),
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
        callbacks=[ckpt_cb, *fault.callbacks(), *(callbacks or [])],
        default_root_dir=str(log_dir),
        use_distributed_sampler=False,
        deterministic=False,
        plugins=fault.plugins(),
    )
    if world_size_of(tr) > 1:
        kwargs["strategy"] = "ddp_find_unused_parameters_true"
    return kwargs
