"""NeMo-Megatron-Launcher's spellings, still accepted: the one table that maps them to promptlaunch's words.

``ALIASES`` maps, per key a command line sets (``cluster_type`` or a config group), an old value -- a whole value,
or the first folder of a group option -- to the new one: ``cluster_type=bcm`` -> ``cluster_type=slurm``,
``evaluation=prompt_gpt3/squad`` -> ``evaluation=gpt/squad``.

``main.py`` rewrites the command line with ``override`` before Hydra reads it (comma sweeps under ``-m`` too); the
launcher maps a ``cluster_type`` set in a config file with ``value``. Config files themselves use the new words: a
``defaults`` list names ``/prompt_learning/gpt/...``, never an alias.
"""
from __future__ import annotations

ALIASES: dict[str, dict[str, str]] = {
    "cluster_type": {"interactive": "local", "bcm": "slurm"},
    "cluster": {"bcm": "slurm"},
    "prompt_learning": {"gpt3": "gpt"},
    "evaluation": {"prompt_gpt3": "gpt", "prompt_t5": "t5", "prompt_mt5": "mt5"},
}


def value(key: str, text: str) -> str:
    """``text`` (a value of ``key``) in the new words: its first ``/``-separated part mapped if it is an alias."""
    head, sep, rest = text.partition("/")
    return ALIASES.get(key, {}).get(head, head) + sep + rest


def override(arg: str) -> str:
    """One command-line override in the new words; anything that is not ``<key>=<v>[,<v>...]`` for a key of the
    table (flags, other keys, ``key.sub=...``) comes back unchanged."""
    key, sep, values = arg.partition("=")
    name = key.lstrip("+~")
    if not sep or name not in ALIASES:
        return arg
    return key + sep + ",".join(value(name, v) for v in values.split(","))
