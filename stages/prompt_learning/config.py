"""The prompt_learning stage's own config rules, torch-free, in one place with one wording (the full key path).

:func:`check` is the stage's entry in the launcher's registry (``launcher/validate.py``): the launcher calls it
before anything is written or submitted, and the stage calls it again inside the job on the config it was handed,
so a hand-edited ``<name>_hydra.yaml`` is checked the same way. Rules that need the loaded model or the data
(restored tasks are in the artifact, records match their templates) live where those are loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from omegaconf import ListConfig, OmegaConf

from stages.common.checks import (Need, is_nemo_file, StageCheck, Trainer, boolean, check_keys, check_writable,
                                  check_trainer, number, positive_int, require_gpu, stage_keys)
from stages.common.errors import UserError
from stages.common.trackers import Trackers, check_trackers
from stages.engine.base_model import architecture, check_reference
from stages.engine.template import TaskTemplate, parse_templates
from stages.prompt_learning.identity import ignored_keys
from stages.engine.layer_compile import check_compiler
from stages.prompt_learning.keys import OPTIONAL
from stages.prompt_learning.parallel.layout import ParallelLayout, check_model_for_layout, layout_from_config

STAGE = "prompt_learning"
KEY = f"{STAGE}.model"
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "constant", "linear")
STYLES = ("prompt-tuning", "p-tuning")
ENCODERS = ("mlp", "lstm")
INIT_METHODS = ("random", "text", "vocab", "file")


@dataclass(frozen=True)
class Tasks:
    """What to tune: the prompt style, every task template, the new (trainable) and existing (frozen) tasks."""

    style: str
    templates: dict[str, TaskTemplate]
    new: list[str]
    existing: list[str]


def task_names(m: Any, key: str) -> list[str]:
    """``new_tasks=squad`` (a bare string) means ``[squad]``; the config gets the list written back."""
    raw = m.get(key)
    if raw is None:
        return []
    if isinstance(raw, str):
        m[key] = [raw] if raw else []
        return [raw] if raw else []
    if not isinstance(raw, (list, ListConfig)) or any(not isinstance(t, str) or not t for t in raw):
        raise UserError(f"{KEY}.{key}: expected a list of task names such as [squad], got {raw!r}")
    return [str(t) for t in raw]


def check_tasks(m: Any) -> Tasks:
    """``model.virtual_prompt_style``, ``p_tuning.encoder_type``, ``task_templates``, ``new_tasks``,
    ``existing_tasks`` (with ``restore_path``) and ``prompt_tuning.new_prompt_init_methods``."""
    style = m.get("virtual_prompt_style")
    if style not in STYLES:
        raise UserError(f"{KEY}.virtual_prompt_style: '{style}' is not one of {', '.join(STYLES)}")
    if style == "p-tuning":
        enc = (m.get("p_tuning") or {}).get("encoder_type")
        if enc not in ENCODERS:
            raise UserError(f"{KEY}.p_tuning.encoder_type: '{enc}' is not one of {', '.join(ENCODERS)}")
    raw = m.get("task_templates")
    templates = parse_templates((OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw) or [], f"{KEY}.task_templates")
    new, existing = task_names(m, "new_tasks"), task_names(m, "existing_tasks")
    if not new:
        raise UserError(f"{KEY}.new_tasks: empty; name the task(s) to tune, e.g. new_tasks=[squad]")
    for key, names in (("new_tasks", new), ("existing_tasks", existing)):
        for n in names:
            if n not in templates:
                raise UserError(f"{KEY}.{key}: '{n}' has no entry in model.task_templates (have: {sorted(templates)})")
    both = set(new) & set(existing)
    if both:
        raise UserError(f"{KEY}.new_tasks: {sorted(both)} also in existing_tasks; a task is either new or existing")
    if existing and not m.get("restore_path"):
        raise UserError(f"{KEY}.restore_path: required with existing_tasks; point it at the prompt artifact to extend")
    if style == "prompt-tuning":
        methods = list((m.get("prompt_tuning") or {}).get("new_prompt_init_methods") or [])
        if methods and len(methods) not in (1, len(new)):
            raise UserError(f"{KEY}.prompt_tuning.new_prompt_init_methods: {len(methods)} entries for {len(new)} new "
                            "tasks; give one per task")
        for method in methods:
            if method not in INIT_METHODS:
                raise UserError(f"{KEY}.prompt_tuning.new_prompt_init_methods: '{method}' is not one of "
                                f"{', '.join(INIT_METHODS)}")
    return Tasks(str(style), templates, new, existing)


def check_batching_flags(m: Any) -> tuple[bool, bool]:
    """(share_prefix, length_bucketing) of ``model.data``, each true or false. Where they cannot apply the stage
    switches them off with a logged line instead of failing (train.py): the CPU default config turns them on, and
    ``trainer.devices=2`` on top of it should still just work."""
    data = m.get("data") or {}
    flags = []
    for key in ("share_prefix", "length_bucketing"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise UserError(f"{KEY}.data.{key}: must be true or false, got {value!r}")
        flags.append(value)
    return flags[0], flags[1]


def check_p_tuning_dropout(m: Any, style: str, model_parallel: bool) -> None:
    """``model.p_tuning.dropout`` in [0, 1); 0 under tensor/pipeline parallelism with P-tuning: every tensor-parallel
    rank recomputes the prompt encoder, and the results must agree."""
    dropout = number((m.get("p_tuning") or {}).get("dropout", 0.0) or 0.0, f"{KEY}.p_tuning.dropout", 0, 1, high_open=True)
    if style != "p-tuning" or not model_parallel:
        return
    if dropout > 0:
        raise UserError(f"{KEY}.p_tuning.dropout={dropout}: P-tuning with tensor/pipeline parallelism needs dropout 0 "
                        "(every tensor-parallel rank recomputes the prompt encoder and the results must agree); set "
                        f"{KEY}.p_tuning.dropout=0.0 or tensor_model_parallel_size=pipeline_model_parallel_size=1")


@dataclass(frozen=True)
class Checked:
    """The checked stage config: what the launcher needs (``stage``) and what the job plans with."""

    stage: StageCheck
    trainer: Trainer
    tasks: Tasks
    layout: ParallelLayout
    compile: bool
    share_prefix: bool
    length_bucketing: bool
    trackers: Trackers = Trackers()   # exp_manager.create_wandb_logger / create_mlflow_logger (stages/common/trackers.py)


def check(sc: Any) -> StageCheck:
    """The registry's entry (``launcher/validate.py``): what the launcher needs to know of the checked config."""
    return check_config(sc).stage


def known_keys() -> frozenset[str]:
    """The keys a ``prompt_learning`` config may have (the registry's entry for the strict-key check)."""
    return stage_keys(STAGE, OPTIONAL)


def check_config(sc: Any) -> Checked:
    """Every rule of the ``prompt_learning`` config that needs neither the data nor the loaded model."""
    check_keys(sc, known_keys(), STAGE)
    trainer = check_trainer(sc, STAGE)
    t, m = sc.trainer, sc.get("model")
    if m is None:
        raise UserError(f"{KEY}: missing; the stage config must have a model block")
    tasks = check_tasks(m)
    compile_on = boolean(t.get("compile", False), f"{STAGE}.trainer.compile")
    if compile_on and trainer.world_size > 1:
        raise UserError(f"{STAGE}.trainer.compile: runs in one process only, this run has {trainer.world_size} "
                        f"(trainer.devices x trainer.num_nodes); set {STAGE}.trainer.compile=false or devices=1")
    if trainer.world_size > 1 and trainer.precision.startswith("16"):
        raise UserError(f"{STAGE}.trainer.precision: {trainer.precision}: fp16 loss scaling is not supported with "
                        f"several processes; use bf16-mixed (GPU) or 32")
    layout = check_nodes(sc, trainer)
    result = StageCheck(resources=trainer.resources(), takes_signal=True)   # fault/: checkpoint, requeue
    if trainer.accelerator == "gpu":
        result.here.append(lambda: require_gpu(f"{STAGE}.trainer.accelerator"))
    result.here += trainer.precision_check(STAGE)
    if compile_on and trainer.accelerator == "cpu":
        result.here.append(lambda: check_compiler(f"{STAGE}.trainer.compile"))

    path = m.get("language_model_path")
    need = check_reference(path, f"{KEY}.language_model_path")
    if need is not None:
        result.reads.append(need)
    _check_model_layout(path, layout)
    check_p_tuning_dropout(m, tasks.style, layout.is_model_parallel)
    if tasks.existing:
        restore = str(m.get("restore_path"))
        result.reads.append(Need(restore, f"{KEY}.restore_path", "point it at a prompt artifact written by an earlier "
                                 "run or a NeMo prompt-learning .nemo", folder=not is_nemo_file(restore)))
    result.reads += _check_data(m, tasks)
    share_prefix, length_bucketing = check_batching_flags(m)
    _check_optim(m)
    _check_limits(t)
    result.signal_warning = _check_exp_manager(sc)
    trackers = check_trackers(sc.get("exp_manager"), f"{STAGE}.exp_manager")
    result.writes.append(os.path.normpath(str(m.get("artifact_path"))))
    nemo_path = m.get("nemo_path")
    if nemo_path is not None:
        _check_nemo_path(str(nemo_path), tasks)
    return Checked(result, trainer, tasks, layout, compile_on, share_prefix, length_bucketing, trackers)


def check_nodes(sc: Any, trainer: Trainer) -> ParallelLayout:
    """The job's plan before launch: ``trainer.num_nodes x trainer.devices`` processes against ``TP x PP x DP``
    (``layout.make_layout``), ``run.nodes`` against ``trainer.num_nodes``, and, across nodes, tensor-parallel groups
    within a node. Every mismatch is one line, all of them in one error; returns the layout."""
    lines = []
    run_nodes = (sc.get("run") or {}).get("nodes")
    if run_nodes is not None and run_nodes != trainer.num_nodes:
        lines.append(f"{STAGE}.run.nodes: {run_nodes} but {STAGE}.trainer.num_nodes={trainer.num_nodes}, which is what "
                     f"the job asks for ({trainer.num_nodes} x trainer.devices={trainer.devices} processes); set "
                     f"{STAGE}.trainer.num_nodes={run_nodes}, or {STAGE}.run.nodes={trainer.num_nodes}")
    layout = None
    try:
        layout = layout_from_config(sc.model, trainer.world_size, prefix=f"{STAGE}.")
    except UserError as exc:
        lines.extend(exc.lines)
    if layout is not None and trainer.num_nodes > 1 and trainer.devices % layout.tp:
        lines.append(f"{KEY}.tensor_model_parallel_size: {layout.tp} does not divide {STAGE}.trainer.devices="
                     f"{trainer.devices} (processes per node), so with {trainer.num_nodes} nodes a tensor-parallel group "
                     f"would span two nodes and all-reduce every layer across the network; set "
                     f"{KEY}.tensor_model_parallel_size to a divisor of {trainer.devices} or trainer.devices to a multiple "
                     f"of {layout.tp}")
    if lines:
        raise UserError(*lines)
    assert layout is not None
    return layout


def _check_model_layout(path: Any, layout: ParallelLayout) -> None:
    """The model's architecture as far as it can be read here (config.json, or a .nemo's model_config.yaml, which
    is refused here when no Hugging Face class computes it exactly), and TP/PP against its heads and layers."""
    config = architecture(path, f"{KEY}.language_model_path")
    if config is None or not layout.is_model_parallel:
        return
    try:
        check_model_for_layout(config, layout, prefix=f"{STAGE}.")
    except UserError as exc:
        if config.model_type == "gpt2" and (str(path).endswith(".nemo") or os.path.isfile(os.path.join(str(path), "model_config.yaml"))):
            raise UserError(
                f"{str(exc).split(';')[0]}; set {KEY}.tensor_model_parallel_size=1 and "
                f"{KEY}.pipeline_model_parallel_size=1: the .nemo's own tensor/pipeline shards (mp_rank_XX, "
                f"tp_rank_XX_pp_rank_YYY) are merged when it is read, so a TP=2 .nemo trains unsharded, and "
                f"trainer.devices x num_nodes > 1 still splits the batch (data parallelism)") from None
        if isinstance(path, str) and path.startswith("embedded:") and layout.tp > 1:
            sizes = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
            fits = " or ".join(str(d) for d in range(1, sizes[0] + 1) if all(n % d == 0 for n in sizes))
            raise UserError(
                f"{str(exc).split(';')[0]}: {path} has {sizes[0]} attention heads and {sizes[1]} key/value heads, so "
                f"only tensor_model_parallel_size={fits} fits it; to try tensor parallelism on CPU point {KEY}.language_model_path at a small Llama folder "
                f"whose head counts TP divides (e.g. a tiny random Llama with 4 heads and 2 KV heads)"
            ) from None
        raise


def _check_nemo_path(nemo_path: str, tasks: Tasks) -> None:
    """NeMo's ``model.nemo_path``: one NeMo prompt file, and NeMo >= 1.17's holds one table, so one new task."""
    if not nemo_path.endswith(".nemo"):
        raise UserError(f"{KEY}.nemo_path: '{nemo_path}' must end with .nemo (or set it to null: every task's NeMo "
                        "prompt file is in <artifact_path>/export/nemo/ anyway)")
    if len(tasks.new) != 1:
        raise UserError(f"{KEY}.nemo_path: a NeMo >= 1.17 prompt file holds one task's table and new_tasks has "
                        f"{len(tasks.new)}; set {KEY}.nemo_path=null and take <artifact_path>/export/nemo/<task>.nemo")
    check_writable(nemo_path, f"{KEY}.nemo_path")


def _check_data(m: Any, tasks: Tasks) -> list[Need]:
    """``model.data``: the train and validation files, the sequence lengths (room for text after every template's
    virtual tokens), the example limits and the loader workers."""
    data = m.get("data")
    if data is None:
        raise UserError(f"{KEY}.data: missing; give train_ds and validation_ds")
    reads = []
    for key in ("train_ds", "validation_ds"):
        files = data.get(key)
        if isinstance(files, str):
            files = [files]
        if not files:
            raise UserError(f"{KEY}.data.{key}: empty; list one or more JSONL files")
        reads += [Need(str(f), f"{KEY}.data.{key}", "run the data_preparation stage first or fix the path") for f in files]
    longest = positive_int(data.get("max_seq_length", 1), f"{KEY}.data.max_seq_length")
    shortest = positive_int(data.get("min_seq_length") or 1, f"{KEY}.data.min_seq_length")   # null: 1
    if shortest > longest:
        raise UserError(f"{KEY}.data.min_seq_length: {shortest} is above {KEY}.data.max_seq_length={longest}, so every "
                        f"example would be dropped; lower it")
    for name in tasks.new + tasks.existing:
        virtual = tasks.templates[name].total_virtual_tokens
        if virtual >= longest:
            raise UserError(f"{KEY}.data.max_seq_length: {longest} leaves no room for text after the {virtual} virtual "
                            f"tokens of task '{name}'; raise it well above {virtual}")
    for key in ("max_train_examples", "max_val_examples"):
        if data.get(key) is not None:
            positive_int(data.get(key), f"{KEY}.data.{key}")
    workers = data.get("num_workers", 0)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise UserError(f"{KEY}.data.num_workers: must be an integer >= 0 (0 = load in the main process), got {workers!r}")
    boolean(data.get("truncate_keep_answer", False), f"{KEY}.data.truncate_keep_answer")
    return reads


def _check_optim(m: Any) -> None:
    """Optimizer, its hyper-parameters and the schedule: caught here instead of minutes into the job."""
    optim = m.get("optim") or {}
    name = str(optim.get("name", "adamw")).lower()
    if name not in OPTIMIZERS:
        raise UserError(f"{KEY}.optim.name: '{optim.get('name')}' is not one of {', '.join(OPTIMIZERS)}")
    number(optim.get("lr"), f"{KEY}.optim.lr", 0, low_open=True)
    number(optim.get("weight_decay", 0.0), f"{KEY}.optim.weight_decay", 0)
    betas = optim.get("betas", [0.9, 0.999])
    if not isinstance(betas, (list, ListConfig)) or len(betas) != 2:
        raise UserError(f"{KEY}.optim.betas: must be two numbers in [0, 1) such as [0.9, 0.98], got {betas!r}")
    for i, beta in enumerate(betas):
        number(beta, f"{KEY}.optim.betas[{i}]", 0, 1, high_open=True)
    sched = optim.get("sched") or {}
    if str(sched.get("name", "constant")) not in SCHEDULES:
        raise UserError(f"{KEY}.optim.sched.name: '{sched.get('name')}' is not one of {', '.join(SCHEDULES)}")
    warmup = sched.get("warmup_steps", 0)
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
        raise UserError(f"{KEY}.optim.sched.warmup_steps: must be an integer >= 0, got {warmup!r}")
    number(sched.get("min_lr", 0.0), f"{KEY}.optim.sched.min_lr", 0)


def _check_limits(t: Any) -> None:
    """``trainer.max_steps`` / ``max_epochs`` (positive or -1, not both unlimited), ``val_check_interval``,
    ``log_every_n_steps`` and ``gradient_clip_val``."""
    steps, epochs = t.get("max_steps", -1), t.get("max_epochs", -1)
    for key, value in (("max_steps", steps), ("max_epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1):
            raise UserError(f"{STAGE}.trainer.{key}: must be a positive integer or -1 (no limit), got {value!r}")
    if (steps is None or steps == -1) and (epochs is None or epochs == -1):
        raise UserError(f"{STAGE}.trainer.max_steps: -1 together with max_epochs=-1 would train forever; set one of them")
    every = t.get("val_check_interval", 1.0)
    if isinstance(every, bool) or not (isinstance(every, int) and every >= 1 or isinstance(every, float) and 0 < every <= 1):
        raise UserError(f"{STAGE}.trainer.val_check_interval: must be an integer >= 1 (train batches between "
                        f"validations) or a fraction in (0, 1] of an epoch, got {every!r}")
    positive_int(t.get("log_every_n_steps", 10), f"{STAGE}.trainer.log_every_n_steps")
    if t.get("gradient_clip_val") is not None:
        number(t.gradient_clip_val, f"{STAGE}.trainer.gradient_clip_val", 0)


def _check_exp_manager(sc: Any) -> str | None:
    """``exp_manager``; returns the warning to print when the cluster will send the preemption signal."""
    em = sc.get("exp_manager") or {}
    every = (em.get("checkpoint_callback_params") or {}).get("every_n_train_steps")
    if every is not None:
        positive_int(every, f"{STAGE}.exp_manager.checkpoint_callback_params.every_n_train_steps")
    ignored_keys(em.get("resume_ignore_changes"))
    if boolean(em.get("resume_if_exists", False), f"{STAGE}.exp_manager.resume_if_exists"):
        return None
    return (f"cluster.signal is set but {STAGE}.exp_manager.resume_if_exists=false: a job requeued after the signal "
            "would start over instead of resuming")
