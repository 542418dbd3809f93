"""The commands that build the tiny random models, exactly as README.md prints them (parsed from it, so the test fails
when the README drifts): each runs and leaves a folder transformers opens (config.json, tokenizer, weights); the
squad_tiny configs print the same commands and read the folders they write."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

COMMAND = re.compile(r"^(?:#\s+)?(python3 -m tests\.support\.tiny_models (\S+) (\S+))", re.M)
CONFIGS = {family: ROOT / "conf" / "prompt_learning" / family / "squad_tiny.yaml" for family in ("t5", "mt5")}


def commands(path: Path) -> dict[str, tuple[str, str]]:
    """family -> (the command line up to its output folder, the output folder), as ``path`` prints them."""
    found: dict[str, tuple[str, str]] = {}
    for m in COMMAND.finditer(path.read_text(encoding="utf-8")):
        command, family, folder = m.groups()
        assert found.get(family, (command, folder)) == (command, folder), f"{path}: two different commands for {family}"
        found[family] = (command, folder)
    return found


def test_readme_prints_a_build_command_for_every_family():
    assert sorted(commands(ROOT / "README.md")) == ["llama", "mt5", "t5"]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_squad_tiny_configs_print_the_readme_command_and_read_its_folder(family):
    config = CONFIGS[family]
    assert commands(config) == {family: commands(ROOT / "README.md")[family]}
    folder = commands(config)[family][1]
    assert folder.startswith("data/tiny_models/")   # data_dir defaults to <launcher>/data
    wanted = "${data_dir}/" + folder[len("data/"):]
    assert f"language_model_path: {wanted}" in config.read_text(encoding="utf-8")


@pytest.mark.parametrize("family", ["llama", "t5", "mt5"])
def test_readme_build_command_writes_a_folder_that_loads(tmp_path, family):
    """The README's command as printed (``python3`` being this interpreter), run in a temporary folder with the
    repository on PYTHONPATH, so its relative output folder lands there."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    command, folder = commands(ROOT / "README.md")[family]
    argv = shlex.split(command)
    assert argv[0] == "python3"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / folder
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["promptlaunch_note"].startswith("RANDOMLY INITIALISED")
    assert (out / "README.txt").read_text(encoding="utf-8").startswith("RANDOMLY INITIALISED")
    config = AutoConfig.from_pretrained(str(out))
    assert config.model_type == family
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("Paris", add_special_tokens=False).input_ids
    auto = AutoModelForCausalLM if family == "llama" else AutoModelForSeq2SeqLM
    model = auto.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
