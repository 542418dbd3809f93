"""The evaluation stage's config, checked in one place: every mistake is a UserError naming its full key.

:func:`check` is the stage's entry in the launcher's registry: ``Settings.from_cfg(cfg, in_job=False)`` before
anything is submitted (the keys only: files may be produced by an earlier stage and devices belong to another
machine). The stage calls ``Settings.from_cfg`` again inside the job, where the artifact folder and the device are
checked too."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from stages.common.checks import Need, is_nemo_file, StageCheck, Trainer, boolean, check_keys, check_trainer, require_gpu, stage_keys
from stages.common.errors import UserError
from stages.common.trackers import Trackers, check_trackers
from stages.engine.base_model import check_reference
from stages.engine.template import parse_templates
from stages.evaluation.keys import OPTIONAL

PREFIX = "evaluation"
ARTIFACT_FILE = "artifact.json"
NEMO_CONFIG = "model_config.yaml"   # an unpacked NeMo prompt-learning .nemo


def _int(value: Any, key: str, minimum: int, meaning: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{PREFIX}.{key}: must be an integer >= {minimum}{meaning}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """What the stage reads from its ``<name>_hydra.yaml`` (the resolved ``evaluation`` subtree)."""

    run_name: str
    results_dir: Path
    device: str
    artifact_path: Path | None            # None with inference.baseline_only
    language_model_path: str | None       # None: the base model recorded in the artifact
    task_templates: list[dict[str, Any]] | None  # used only with inference.baseline_only
    test_ds: Path
    batch_size: int
    offset: int
    max_examples: int | None
    tokens_to_generate: int
    stop_strings: tuple[str, ...]
    compare_baseline: bool
    baseline_only: bool
    progress: bool
    share_prefix: bool = False            # generate with shared-context prefixes (PromptedModel.generate)
    prompt_lookup_num_tokens: int = 0     # draft tokens copied from the prompt per decoding pass (0 = off)
    prompt_lookup_pass_budget: int | None = None   # at most this many row-tokens per decoding pass (None: no limit)
    trainer: Trainer | None = None        # devices, accelerator, reuse_host_memory (stages/engine/host_memory.py)
    trackers: Trackers = Trackers()       # exp_manager: W&B / MLflow (trackers.py)

    @property
    def reuse_host_memory(self) -> bool:
        """Keep freed CPU memory for the next batch (the default when no trainer block was checked)."""
        return self.trainer.reuse_host_memory if self.trainer else True

    @classmethod
    def from_cfg(cls, cfg: DictConfig, *, in_job: bool = True) -> "Settings":
        check_keys(cfg, known_keys(), PREFIX)
        run = cfg.get("run") or {}
        if in_job and not run.get("results_dir"):
            raise UserError(f"{PREFIX}.run.results_dir: missing; the launcher sets it, pass the <name>_hydra.yaml it wrote")
        model = cfg.get("model") or {}
        data = cfg.get("data") or {}
        inf = cfg.get("inference") or {}
        budget = inf.get("prompt_lookup_pass_budget")   # null = no limit

        trainer = check_trainer(cfg, PREFIX)
        if trainer.world_size != 1:
            raise UserError(
                f"{PREFIX}.trainer: devices x num_nodes = {trainer.world_size}, but evaluation runs in one process on one "
                f"device; set {PREFIX}.trainer.devices=1 and {PREFIX}.trainer.num_nodes=1"
            )
        device = "cpu"
        if trainer.accelerator == "gpu" and in_job:
            require_gpu(f"{PREFIX}.trainer.accelerator")
            device = "cuda"

        baseline_only = boolean(inf.get("baseline_only", False), f"{PREFIX}.inference.baseline_only")
        compare_baseline = boolean(inf.get("compare_baseline", False), f"{PREFIX}.inference.compare_baseline")
        if inf.get("greedy", True) is not True:
            raise UserError(f"{PREFIX}.inference.greedy: only greedy decoding is supported (sampling lowers exact match); set {PREFIX}.inference.greedy=true")

        lm = model.get("language_model_path")
        if lm is not None:
            check_reference(lm, f"{PREFIX}.model.language_model_path")
        templates = model.get("task_templates")
        if isinstance(templates, (DictConfig, ListConfig)):
            templates = OmegaConf.to_container(templates, resolve=True)
        artifact: Path | None = None
        if baseline_only:
            if lm is None:
                raise UserError(
                    f"{PREFIX}.model.language_model_path: required with {PREFIX}.inference.baseline_only=true (there is no artifact "
                    f"to take the base model from); set e.g. {PREFIX}.model.language_model_path=embedded:smollm2-135m-instruct"
                )
            if not templates:
                raise UserError(
                    f"{PREFIX}.model.task_templates: required with {PREFIX}.inference.baseline_only=true; list the templates, "
                    f"e.g. {PREFIX}.model.task_templates='${{prompt_learning.model.task_templates}}'"
                )
            if not isinstance(templates, list) or not all(isinstance(t, dict) for t in templates):
                raise UserError(f"{PREFIX}.model.task_templates: must be a list of template entries (taskname, prompt_template, ...)")
            parse_templates(templates, f"{PREFIX}.model.task_templates")  # same checks as prompt_learning
        else:
            artifact = _artifact(model.get("artifact_path"), exists=in_job)

        test_ds = data.get("test_ds")
        if not test_ds or not isinstance(test_ds, str):
            raise UserError(f"{PREFIX}.data.test_ds: missing; give the test JSONL (e.g. squad_test_ground_truth.jsonl)")
        max_examples = data.get("max_examples")
        if max_examples is not None:
            max_examples = _int(max_examples, "data.max_examples", 1)

        stops = inf.get("stop_strings", ["\n"])
        if stops is None:
            stops = []
        if isinstance(stops, str):
            stops = [stops]
        if not isinstance(stops, (list, ListConfig)) or not all(isinstance(s, str) and s for s in stops):
            raise UserError(f"{PREFIX}.inference.stop_strings: must be a list of non-empty strings such as [\"\\n\"], got {stops!r}")

        return cls(
            run_name=str(run.get("name") or "evaluation"),
            results_dir=Path(str(run.get("results_dir"))).expanduser(),
            device=device,
            artifact_path=artifact,
            language_model_path=lm,
            task_templates=templates if baseline_only else None,
            test_ds=Path(test_ds).expanduser(),
            batch_size=_int(data.get("batch_size", 8), "data.batch_size", 1),
            offset=_int(data.get("offset", 0) or 0, "data.offset", 0),
            max_examples=max_examples,
            tokens_to_generate=_int(inf.get("tokens_to_generate", 32), "inference.tokens_to_generate", 1),
            stop_strings=tuple(stops),
            compare_baseline=compare_baseline and not baseline_only,
            baseline_only=baseline_only,
            progress=boolean(inf.get("progress", True), f"{PREFIX}.inference.progress"),
            share_prefix=boolean(inf.get("share_prefix", False), f"{PREFIX}.inference.share_prefix"),
            prompt_lookup_num_tokens=_int(inf.get("prompt_lookup_num_tokens", 0), "inference.prompt_lookup_num_tokens", 0, " (0 = off)"),
            prompt_lookup_pass_budget=(None if budget is None else
                                       _int(budget, "inference.prompt_lookup_pass_budget", 1, " or null (no limit)")),
            trainer=trainer,
            trackers=check_trackers(cfg.get("exp_manager"), f"{PREFIX}.exp_manager"),
        )


def known_keys() -> frozenset[str]:
    """The keys an ``evaluation`` config may have (the registry's entry for the strict-key check)."""
    return stage_keys(PREFIX, OPTIONAL)


def check(cfg: DictConfig) -> StageCheck:
    """The registry's entry: the keys (:meth:`Settings.from_cfg` before submission) and the files across the run."""
    settings = Settings.from_cfg(cfg, in_job=False)
    result = StageCheck(resources=settings.trainer.resources())
    if settings.trainer.accelerator == "gpu":
        result.here.append(lambda: require_gpu(f"{PREFIX}.trainer.accelerator"))
    result.here += settings.trainer.precision_check(PREFIX)
    if settings.artifact_path is not None:
        result.reads.append(Need(str(settings.artifact_path), f"{PREFIX}.model.artifact_path",
                                 "run the prompt_learning stage first or point it at a prompt artifact (or a NeMo "
                                 "prompt-learning .nemo)", folder=not is_nemo_file(settings.artifact_path)))
    if settings.language_model_path is not None:
        need = check_reference(settings.language_model_path, f"{PREFIX}.model.language_model_path")
        result.reads += [need] if need else []
    result.reads.append(Need(str(settings.test_ds), f"{PREFIX}.data.test_ds",
                             "run the data_preparation stage first or fix the path"))
    return result


def _artifact(value: Any, exists: bool = True) -> Path:
    """The prompt artifact folder; missing or incomplete -> say to run prompt_learning first (``exists=False``:
    only that it is named, before submission, when an earlier stage of the run may still write it)."""
    key = f"{PREFIX}.model.artifact_path"
    fix = (
        f"run the prompt_learning stage first (stages=[prompt_learning,evaluation]), point {key} at a prompt artifact "
        f"folder or a NeMo prompt-learning .nemo, or set {PREFIX}.inference.baseline_only=true to score the untuned model"
    )
    if not value or not isinstance(value, str):
        raise UserError(f"{key}: missing; {fix}")
    path = Path(value).expanduser()
    if not exists:
        return path
    if not path.exists():
        raise UserError(f"{key}: '{value}' does not exist; {fix}")
    if is_nemo_file(path):   # a NeMo prompt-learning .nemo: its content is checked where it is read (load_artifact)
        return path
    if not path.is_dir() or not ((path / ARTIFACT_FILE).is_file() or (path / NEMO_CONFIG).is_file()):
        raise UserError(f"{key}: '{value}' is not a prompt artifact folder (no {ARTIFACT_FILE}) nor a NeMo "
                        f"prompt-learning .nemo; {fix}")
    return path
