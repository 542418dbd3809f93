"""Typed settings from an OmegaConf node: merge into a dataclass schema so a wrong type names its key.

Used by the launcher (its global and ``run`` schemas) and by the executors (each one's settings dataclass).
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stages.common.checks import check_keys
from stages.common.errors import UserError


def typed(schema: type, cfg: Any, key: str) -> Any:
    """Merge ``cfg`` into ``schema``; a key ``schema`` does not declare is refused (``checks.check_keys``, with the
    nearest field), a type error names ``key.sub``."""
    fields = schema.__dataclass_fields__  # type: ignore[attr-defined]
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    check_keys(data, fields, key)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        sub = getattr(exc, "full_key", "") or ""
        msg = str(exc).splitlines()[0]
        raise UserError(f"{key}.{sub}: {msg}; fix the value in the config or on the command line") from None
    return obj
