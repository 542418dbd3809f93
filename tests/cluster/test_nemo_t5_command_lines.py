"""The NeMo launcher's T5 and mT5 prompt-learning command lines (NeMo-Megatron-Launcher README 23.03, section
5.10.2.3, without the ``>> log`` redirect) render in a BCP dry run when ``language_model_path`` names a NeMo T5 /
mT5 ``.nemo`` (a tiny RANDOMLY INITIALISED fixture placed where the launcher's convert_nemo stage writes it): the
checks before submission accept the file and the job's config carries it. The scripts themselves are the golden
``tests/golden/bcp/prompt_learning_{t5,mt5}.sh`` ones (the model path lives in the config, not in the script)."""
from __future__ import annotations

import pytest

from tests.cluster.test_slurm_bcp_golden import dry_run

pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

NEMO_COMMANDS = {
    "t5": ["prompt_learning=t5/squad", "stages=[prompt_learning]", "prompt_learning.run.model_train_name=t5_220m"],
    "mt5": ["prompt_learning=mt5/squad", "stages=[prompt_learning]", "prompt_learning.run.model_train_name=mt5_390m"],
}


@pytest.mark.parametrize("family", sorted(NEMO_COMMANDS))
def test_nemo_launcher_command_line_with_a_nemo_t5(tmp_path, family):
    from tests.support import nemo_t5

    model = {"t5": "t5_220m", "mt5": "mt5_390m"}[family]
    nemo = tmp_path / "mount" / "results" / model / "convert_nemo" / "results" / f"megatron_{family}.nemo"
    nemo.parent.mkdir(parents=True)
    cfg, tok = nemo_t5.t5_config(family), nemo_t5.tokenizer_member(family)
    nemo_t5.write(nemo, cfg, {"model_weights.ckpt": nemo_t5.random_legacy_state(cfg, nemo_t5.nemo_vocab_size(family, tok, cfg))}, tok)
    (script,) = dry_run(tmp_path, "bcp", *NEMO_COMMANDS[family], f"prompt_learning.model.language_model_path={nemo}").values()
    assert "bcprun --nnodes 1 --npernode 8 -no_redirect --workdir /opt/promptlaunch \\" in script
    stage = tmp_path / "mount" / "results" / model / "prompt_learning_squad"
    (config,) = stage.glob(f"squad_{model}_hydra-*.yaml")
    assert f"language_model_path: {nemo}" in config.read_text()
