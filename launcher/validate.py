"""Cross-field checks run before anything is written or submitted.

Each check raises UserError with one line: the key (or file) at fault and the fix. Input files are
required to exist unless an earlier stage of the same pipeline writes them; in a dry run, missing
inputs are reported as warnings, since nothing will read them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from stages.common.errors import UserError
from launcher.plan import SIGNAL_STAGES
from stages.data_preparation.settings import Settings as DataPreparationSettings
from stages.data_preparation.settings import raw_name
from stages.evaluation.settings import Settings
from stages.prompt_learning.config import check_batching_flags, check_p_tuning_dropout, check_tasks
from cluster import CLUSTER_TYPES
from cluster.render import check_env_names
from cluster.slurm import SlurmConfig as ClusterSchema
from launcher.schema import GlobalSchema, RunSchema
from stages.common.typed import typed

STAGE_NAMES = ("data_preparation", "prompt_learning", "evaluation")
TRAINER_STAGES = ("prompt_learning", "evaluation")
SQUAD_OUTPUTS = ("squad_train.jsonl", "squad_val.jsonl", "squad_test.jsonl", "squad_test_ground_truth.jsonl")
MODEL_FORMATS = "a Hugging Face model folder, a hub id (org/name), a .gguf file or embedded:smollm2-135m-instruct"
_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")


@dataclass
class Checked:
    """What validation learned: the stage list in order and warnings to print."""

    stages: list[str]
    warnings: list[str] = field(default_factory=list)


def normalize_stages(raw: Any) -> list[str]:
    """``stages=prompt_learning`` (a bare string) and ``stages=[a,b]`` both become a list."""
    if isinstance(raw, str):
        items = [s.strip() for s in raw.strip("[]").split(",") if s.strip()]
    elif isinstance(raw, (list, ListConfig)):
        items = [str(s) for s in raw]
    else:
        raise UserError(f"stages: expected a list such as stages=[data_preparation,prompt_learning], got {raw!r}")
    if not items:
        raise UserError("stages: empty; name at least one of " + ", ".join(STAGE_NAMES))
    for s in items:
        if s not in STAGE_NAMES:
            raise UserError(f"stages: unknown stage '{s}'; known stages are {', '.join(STAGE_NAMES)}")
    dup = {s for s in items if items.count(s) > 1}
    if dup:
        raise UserError(f"stages: '{sorted(dup)[0]}' listed twice; list each stage once")
    return items


def _positive_int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key}: must be a positive integer, got {value!r}")
    return value


def _check_writable(path: str, key: str) -> None:
    """The nearest existing ancestor must be a writable folder (a file in the way is the usual mistake)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise UserError(f"{key}: '{path}' must be an absolute path")
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{key}: cannot create '{path}' because '{p}' is a file; choose another folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{key}: '{p}' is not writable; choose a folder you can write to")


class _Inputs:
    """Existence checks for input files, aware of what earlier stages will produce."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.produced: set[str] = set()
        self.warnings: list[str] = []

    def need(self, path: str, key: str, fix: str) -> None:
        norm = os.path.normpath(os.path.expanduser(path))
        if norm in self.produced or os.path.exists(norm):
            return
        msg = f"{key}: '{path}' does not exist; {fix}"
        if self.dry_run:
            self.warnings.append(msg)
        else:
            raise UserError(msg)


def _check_model_path(path: Any, key: str, inputs: _Inputs) -> None:
    if not isinstance(path, str) or not path:
        raise UserError(f"{key}: missing; give {MODEL_FORMATS}")
    if path.endswith(".nemo"):
        raise UserError(f"{key}: '{path}' is a NeMo/Megatron checkpoint, which promptlaunch cannot load; give {MODEL_FORMATS}")
    if path.startswith("embedded:"):
        if path != "embedded:smollm2-135m-instruct":
            raise UserError(f"{key}: unknown embedded model '{path}'; the embedded model is embedded:smollm2-135m-instruct")
        return
    looks_local = path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf") or path.count("/") != 1
    if looks_local:
        inputs.need(path, key, f"give {MODEL_FORMATS}")
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(f"{key}: '{path}' is a folder without config.json, so not a Hugging Face model folder; point it "
                        f"at the folder that holds config.json, the weights and the tokenizer files")
    if local.is_file() and not path.endswith(".gguf"):
        raise UserError(f"{key}: '{path}' is a file but not a .gguf; give {MODEL_FORMATS}")


_SIGNAL = re.compile(r"^(?:SIG)?(USR1|USR2)@(\d+)$")


def _seconds(time_limit: str) -> int:
    days, _, hms = time_limit.rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def _check_signal(value: Any) -> int | None:
    """``cluster.signal``: ``USR1@<seconds>`` (or USR2); returns the lead time in seconds, None when off."""
    if value is None or value == "":
        return None
    text = str(value)
    if text.upper().startswith("B:"):
        raise UserError(f"cluster.signal: '{text}' would signal only the batch shell, but the checkpoint is written by "
                        f"the srun tasks; use '{text[2:]}' (Slurm then signals every task)")
    match = _SIGNAL.match(text.upper())
    if not match or int(match.group(2)) < 1:
        raise UserError(f"cluster.signal: '{text}' is not USR1@<seconds> or USR2@<seconds> (e.g. USR1@120: SIGUSR1 120 s "
                        f"before the time limit); set it so, or to null to turn preemption handling off")
    return int(match.group(2))


def _check_training_knobs(sc: DictConfig) -> None:
    """Optimizer, schedule, step and example limits: caught here instead of minutes into the job."""
    m, t = sc.model, sc.trainer
    optim = m.get("optim") or {}
    name = str(optim.get("name", "adamw")).lower()
    if name not in ("adamw", "adam"):
        raise UserError(f"prompt_learning.model.optim.name: '{optim.get('name')}' is not one of adamw, adam")
    lr = optim.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise UserError(f"prompt_learning.model.optim.lr: must be a number > 0, got {lr!r}")
    sched = optim.get("sched") or {}
    if str(sched.get("name", "constant")) not in ("cosine", "constant", "linear"):
        raise UserError(f"prompt_learning.model.optim.sched.name: '{sched.get('name')}' is not one of cosine, constant, linear")
    warmup = sched.get("warmup_steps", 0)
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0):
        raise UserError(f"prompt_learning.model.optim.sched.warmup_steps: must be an integer >= 0, got {warmup!r}")
    data = m.get("data") or {}
    for key in ("max_train_examples", "max_val_examples"):
        if data.get(key) is not None:
            _positive_int(data.get(key), f"prompt_learning.model.data.{key}")
    steps, epochs = t.get("max_steps", -1), t.get("max_epochs", -1)
    for key, value in (("max_steps", steps), ("max_epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value == 0 or value < -1):
            raise UserError(f"prompt_learning.trainer.{key}: must be a positive integer or -1 (no limit), got {value!r}")
    if (steps is None or steps == -1) and (epochs is None or epochs == -1):
        raise UserError("prompt_learning.trainer.max_steps: -1 together with max_epochs=-1 would train forever; set one of them")


def _check_exp_manager(sc: DictConfig) -> None:
    em = sc.get("exp_manager")
    if em is None:
        return
    every = (em.get("checkpoint_callback_params") or {}).get("every_n_train_steps")
    if every is not None:
        _positive_int(every, "prompt_learning.exp_manager.checkpoint_callback_params.every_n_train_steps")
    resume = em.get("resume_if_exists", False)
    if not isinstance(resume, bool):
        raise UserError(f"prompt_learning.exp_manager.resume_if_exists: must be true or false, got {resume!r}")


def _check_trainer(stage: str, sc: DictConfig, g: GlobalSchema, model: DictConfig) -> int:
    """Devices, nodes and the TP x PP x DP layout; returns the data-parallel size."""
    t = sc.get("trainer")
    if t is None:
        raise UserError(f"{stage}.trainer: missing; the stage config must have a trainer block")
    devices = _positive_int(t.get("devices"), f"{stage}.trainer.devices")
    nodes = _positive_int(t.get("num_nodes", 1), f"{stage}.trainer.num_nodes")
    accel = t.get("accelerator", "cpu")
    if accel not in ("cpu", "gpu"):
        raise UserError(f"{stage}.trainer.accelerator: '{accel}' is not one of cpu, gpu")
    precision = str(t.get("precision", "32"))
    if accel == "cpu" and precision.startswith("bf16"):
        raise UserError(f"{stage}.trainer.precision: {precision} on CPU is emulated and ~300x slower; set {stage}.trainer.precision=32")
    if accel == "cpu" and precision.startswith("16"):
        raise UserError(f"{stage}.trainer.precision: {precision} is not supported on CPU; set {stage}.trainer.precision=32")
    for key, default in (("reuse_host_memory", True), ("compile", False)):
        if not isinstance(t.get(key, default), bool):
            raise UserError(f"{stage}.trainer.{key}: must be true or false, got {t.get(key)!r}")
    if accel == "gpu" and g.cluster_type == "local" and not g.dry_run and shutil.which("nvidia-smi") is None:
        raise UserError(f"{stage}.trainer.accelerator: gpu, but this machine has no GPU; set {stage}.trainer.accelerator=cpu")
    tp = _positive_int(model.get("tensor_model_parallel_size", 1), f"{stage}.model.tensor_model_parallel_size")
    pp = _positive_int(model.get("pipeline_model_parallel_size", 1), f"{stage}.model.pipeline_model_parallel_size")
    world = devices * nodes
    if world % (tp * pp):
        raise UserError(
            f"{stage}.model: tensor_model_parallel_size x pipeline_model_parallel_size = {tp}x{pp} does not divide "
            f"trainer.devices x trainer.num_nodes = {world}; change the devices or the parallel sizes"
        )
    if stage == "prompt_learning" and t.get("compile") is True:
        if world > 1:
            raise UserError(f"{stage}.trainer.compile: runs in one process only, this run has {world} "
                            f"(trainer.devices x trainer.num_nodes); set {stage}.trainer.compile=false or devices=1")
        if accel == "cpu" and g.cluster_type == "local" and not g.dry_run:   # the job runs here
            from stages.prompt_learning.layer_compile import check_compiler

            check_compiler(f"{stage}.trainer.compile")
    return world // (tp * pp)


# What check_model_for_layout needs from the embedded model's config.json (no conversion, no torch here).
_EMBEDDED_CONFIGS = {
    "embedded:smollm2-135m-instruct": {"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3,
                                       "intermediate_size": 1536, "num_hidden_layers": 30},
}


def _model_config(path: Any) -> SimpleNamespace | None:
    """The architecture fields of a local HF folder's config.json (or of the embedded model); None when it is
    only known at run time (hub id, .gguf, missing folder) -- the stage checks those before loading weights."""
    if not isinstance(path, str):
        return None
    if path in _EMBEDDED_CONFIGS:
        return SimpleNamespace(**_EMBEDDED_CONFIGS[path])
    cfg_file = Path(path).expanduser() / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"prompt_learning.model.language_model_path: cannot read {cfg_file} ({exc}); fix or replace the model folder") from None
    if not isinstance(raw, dict):
        return None
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    keys = ("model_type", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers",
            "sliding_window", "use_sliding_window")
    return SimpleNamespace(**{k: text.get(k, raw.get(k)) for k in keys})


def _check_parallel_layout(sc: DictConfig, style: Any) -> None:
    """TP x PP x DP sizes (``stages.prompt_learning.parallel.layout``, torch-free) and, for a model whose
    config.json can be read here, TP against its head counts -- a one-line error before anything is launched."""
    from stages.prompt_learning.parallel.layout import check_model_for_layout, layout_from_config

    m, t = sc.model, sc.trainer
    world = int(t.get("devices", 1)) * int(t.get("num_nodes", 1) or 1)
    layout = layout_from_config(m, world, prefix="prompt_learning.")
    if not layout.is_model_parallel:
        return
    path = m.get("language_model_path")
    config = _model_config(path)
    if config is not None:
        try:
            check_model_for_layout(config, layout, prefix="prompt_learning.")
        except UserError as exc:
            if path in _EMBEDDED_CONFIGS and layout.tp > 1:
                raise UserError(
                    f"{str(exc).split(';')[0]}: {path} has 9 attention heads and 3 key/value heads, so only "
                    f"tensor_model_parallel_size=1 or 3 fits it; to try tensor parallelism on CPU point "
                    f"prompt_learning.model.language_model_path at a small Llama folder whose head counts TP divides "
                    f"(e.g. a tiny random Llama with 4 heads and 2 KV heads)"
                ) from None
            raise
    check_p_tuning_dropout(m, style, layout.is_model_parallel)


def _check_prompt_learning(sc: DictConfig, dp: int, inputs: _Inputs) -> None:
    m = sc.model
    tasks = check_tasks(m)   # the stage's own rules (stages/prompt_learning/config.py)
    style = tasks.style
    if tasks.existing:
        inputs.need(m.get("restore_path"), "prompt_learning.model.restore_path", "point it at a prompt artifact written by an earlier run")
    gbs = _positive_int(m.get("global_batch_size"), "prompt_learning.model.global_batch_size")
    mbs = _positive_int(m.get("micro_batch_size"), "prompt_learning.model.micro_batch_size")
    if gbs % (mbs * dp):
        raise UserError(
            f"prompt_learning.model.global_batch_size: {gbs} is not a multiple of micro_batch_size x data-parallel size = "
            f"{mbs}x{dp}; change one of them"
        )
    _check_model_path(m.get("language_model_path"), "prompt_learning.model.language_model_path", inputs)
    _check_parallel_layout(sc, style)
    data = m.get("data")
    if data is None:
        raise UserError("prompt_learning.model.data: missing; give train_ds and validation_ds")
    for key in ("train_ds", "validation_ds"):
        files = data.get(key)
        if isinstance(files, str):
            files = [files]
        if not files:
            raise UserError(f"prompt_learning.model.data.{key}: empty; list one or more JSONL files")
        for f in files:
            inputs.need(str(f), f"prompt_learning.model.data.{key}", "run the data_preparation stage first or fix the path")
    _positive_int(data.get("max_seq_length", 1), "prompt_learning.model.data.max_seq_length")
    check_batching_flags(m)
    _check_exp_manager(sc)
    _check_training_knobs(sc)
    inputs.produced.add(os.path.normpath(str(m.get("artifact_path"))))


def _check_evaluation(sc: DictConfig, inputs: _Inputs) -> None:
    """The stage's own key checks (stages/evaluation/settings.py), then the files across the run."""
    settings = Settings.from_cfg(sc, in_job=False)
    if settings.artifact_path is not None:
        inputs.need(str(settings.artifact_path), "evaluation.model.artifact_path",
                    "run the prompt_learning stage first or point it at a prompt artifact")
    if settings.language_model_path is not None or settings.baseline_only:
        _check_model_path(settings.language_model_path, "evaluation.model.language_model_path", inputs)
    inputs.need(str(sc.data.test_ds), "evaluation.data.test_ds", "run the data_preparation stage first or fix the path")


def _check_data_preparation(sc: DictConfig, inputs: _Inputs) -> None:
    """The stage's own key checks (stages/data_preparation/settings.py), then the files across the run."""
    settings = DataPreparationSettings.from_cfg(sc)
    if settings.source == "local" and settings.local_dir is not None:
        for split in ("train", "dev"):
            inputs.need(os.path.join(str(settings.local_dir), raw_name(split, settings.version)), "data_preparation.local_dir",
                        "put the official SQuAD v1.1 files there")
    out = str(sc.get("output_dir"))
    _check_writable(out, "data_preparation.output_dir")
    for f in SQUAD_OUTPUTS:
        inputs.produced.add(os.path.normpath(os.path.join(out, f)))


def validate(cfg: DictConfig) -> Checked:
    """Check the composed, resolved config; return the stage list and warnings."""
    stages = normalize_stages(cfg.get("stages"))
    if cfg.get("cluster_type") not in CLUSTER_TYPES:
        raise UserError(f"cluster_type: '{cfg.get('cluster_type')}' is not one of {', '.join(CLUSTER_TYPES)}")
    g: GlobalSchema = typed(GlobalSchema, OmegaConf.merge(cfg, {"stages": stages}), "config")
    typed(ClusterSchema, cfg.get("cluster") or {}, "cluster")
    signal_lead = _check_signal((cfg.get("cluster") or {}).get("signal")) if g.cluster_type == "slurm" else None
    bad_env = check_env_names(g.env_vars)
    if bad_env:
        raise UserError(f"env_vars.{bad_env[0]}: not a valid environment variable name; use letters, digits and _")
    _check_writable(g.base_results_dir, "base_results_dir")
    if g.wandb_api_key_file and g.cluster_type == "local" and not os.path.isfile(g.wandb_api_key_file):
        raise UserError(f"wandb_api_key_file: '{g.wandb_api_key_file}' does not exist; create it or set wandb_api_key_file=null")
    inputs = _Inputs(g.dry_run)
    for stage in stages:
        sc = cfg.get(stage)
        if not isinstance(sc, DictConfig):
            raise UserError(f"{stage}: listed in stages but no config is selected; add e.g. {stage}=<option> (see conf/{stage}/)")
        if "run" not in sc:
            raise UserError(f"{stage}.run: missing; every stage config needs a run block (name, results_dir, time_limit)")
        run: RunSchema = typed(RunSchema, sc.run, f"{stage}.run")
        if not _TIME.match(run.time_limit):
            raise UserError(f"{stage}.run.time_limit: '{run.time_limit}' is not HH:MM:SS or D-HH:MM:SS")
        _positive_int(run.nodes, f"{stage}.run.nodes")
        if not re.match(r"^[A-Za-z0-9_.-]+$", run.name):
            raise UserError(f"{stage}.run.name: '{run.name}' may only use letters, digits, '.', '_' and '-'")
        _check_writable(run.results_dir, f"{stage}.run.results_dir")
        if signal_lead and stage in SIGNAL_STAGES and signal_lead >= _seconds(run.time_limit):
            raise UserError(f"cluster.signal: {cfg.cluster.signal} asks for the signal {signal_lead} s before the time "
                            f"limit, but {stage}.run.time_limit is {run.time_limit}, so the job would be told to "
                            f"checkpoint and requeue at once, again and again; lower the lead time or raise the limit")
        if stage == "data_preparation":
            _check_data_preparation(sc, inputs)
            continue
        dp = _check_trainer(stage, sc, g, sc.get("model") or OmegaConf.create({}))
        if stage == "prompt_learning":
            _check_prompt_learning(sc, dp, inputs)
            if signal_lead and not (sc.get("exp_manager") or {}).get("resume_if_exists", False):
                inputs.warnings.append("cluster.signal is set but prompt_learning.exp_manager.resume_if_exists=false: a job "
                                       "requeued after the signal would start over instead of resuming")
        else:
            _check_evaluation(sc, inputs)
    return Checked(stages=stages, warnings=inputs.warnings)
