"""The NeMo launcher's documented prompt-learning command lines, typed as its users type them: ``/mount/...`` paths,
``/opt/launcher``, NeMo's config names (``gpt3/squad``, ``prompt_gpt3/squad``, ``cluster_type=bcm``) and the
``>> /results/..._log.txt 2>&1`` redirect of a BCP job.

Those absolute paths are real here: each command runs in a private mount namespace (``unshare --mount``, root only)
where a temporary folder is bind-mounted on ``/mount`` and another on ``/results``, holding a NeMo GPT ``.nemo``
fixture at the NeMo launcher's default place, ``/mount/results/gpt3_5b/convert_nemo/results/megatron_gpt.nemo``
(:mod:`tests.support.nemo`: seeded random weights, GPT-2 architecture). Nothing outside the temporary folders is
written, except the two empty mount points, created only when missing and removed afterwards.

* the BCP and Slurm command lines render scripts equal to ``tests/golden/{bcp,slurm}/nemo_launcher_*.sh``;
* the NeMo users' TP=2 form is refused with one line in the log, nothing written;
* the BCP command line really runs data_preparation -> prompt_learning -> evaluation through the emulated
  ``bcprun`` (tests/support/fake_bcprun), on CPU, with the default ``language_model_path`` (no override) and
  NeMo's ``model.nemo_path``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stages.engine.nemo import prompts as nemo_prompts
from tests.support import nemo
from tests.support.cluster import FAKE_BIN
from tests.support.data_preparation import MAIN_OVERRIDES
from tests.support.launcher import undigest
from tests.support.paths import ROOT

GOLDEN = ROOT / "tests" / "golden"
MOUNT_POINTS = (Path("/mount"), Path("/results"))
NEMO = "/mount/results/gpt3_5b/convert_nemo/results/megatron_gpt.nemo"
LOG = "/results/prompt_learning_gpt3_log.txt"
TUNED = "/mount/results/gpt3_5b/prompt_learning_squad/results/p_tuned_gpt3_5b.nemo"

# The NeMo launcher README's BCP command (section "Prompt Learning", Base Command Platform), word for word.
BCP = ("python3 main.py prompt_learning=gpt3/squad stages=prompt_learning cluster_type=bcp "
       "launcher_scripts_path=/opt/launcher data_dir=/mount/data base_results_dir=/mount/results "
       "prompt_learning.run.model_train_name=gpt3_5b "
       f"prompt_learning.model.language_model_path={NEMO}")
# Its Slurm form: conf/config.yaml's `cluster_type: bcm` and `stages: [prompt_learning]` given on the command line.
SLURM = ("python3 main.py prompt_learning=gpt3/squad stages=[prompt_learning] cluster_type=bcm "
         "launcher_scripts_path=/opt/launcher data_dir=/mount/data base_results_dir=/mount/results "
         "prompt_learning.run.model_train_name=gpt3_5b")
# What NeMo users ran for the 5B model saved with TP=2 (NeMo-Framework-Launcher's Airflow examples).
BCP_TP2 = BCP + " prompt_learning.trainer.devices=4 prompt_learning.model.tensor_model_parallel_size=2"
REDIRECT = f" >> {LOG} 2>&1"


def _namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="needs root and `unshare --mount` to place /mount and "
                                "/results as the NeMo launcher's command lines name them")


@pytest.fixture
def mounts(tmp_path):
    """Temporary folders for /mount and /results, with the GPT .nemo fixture where the NeMo launcher puts it."""
    created = [p for p in MOUNT_POINTS if not p.exists()]
    for p in created:
        p.mkdir()
    folders = {"/mount": tmp_path / "mount", "/results": tmp_path / "results"}
    for f in folders.values():
        f.mkdir()
    cfg = nemo.gpt2_config(max_position_embeddings=512, encoder_seq_length=512)
    fixture = folders["/mount"] / NEMO.removeprefix("/mount/")
    fixture.parent.mkdir(parents=True)
    nemo.write_nemo(fixture, cfg, {"model_weights.ckpt": nemo.random_state(cfg)})
    try:
        yield folders
    finally:
        for p in created:
            p.rmdir()


def run_in(folders: dict[str, Path], command: str, env: dict[str, str] | None = None,
           timeout: int = 600) -> subprocess.CompletedProcess:
    """``command`` run by bash from the checkout, with ``folders`` bind-mounted at their keys (a private namespace:
    the mounts vanish with it)."""
    binds = "".join(f"mount --bind {src} {dst}\n" for dst, src in folders.items())
    script = f"set -e\n{binds}cd {ROOT}\n{command}\n"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def on_host(folders: dict[str, Path], path: str) -> Path:
    """Where a file the namespace saw at ``path`` lies in the temporary folders."""
    top = "/" + path.split("/")[1]
    return folders[top] / path.removeprefix(top + "/")


def check_golden(text: str, name: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1" or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs from the rendered script; rerun with UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("command, executor", [(BCP, "bcp"), (SLURM, "slurm")], ids=["bcp", "slurm"])
def test_nemo_launcher_command_line_renders_the_golden_script(mounts, command, executor):
    proc = run_in(mounts, command + " dry_run=true" + REDIRECT)
    log = on_host(mounts, LOG).read_text()
    assert proc.returncode == 0, log + proc.stderr
    assert f"dry run ({executor}): 1 stage(s) written, nothing run" in log
    assert "language_model_path" not in log     # the .nemo is there and its architecture was read: no warning
    folder = on_host(mounts, "/mount/results/gpt3_5b/prompt_learning_squad")
    (script,) = folder.glob(f"squad_gpt3_5b_{executor}.sh")
    check_golden(undigest(script.read_text()), f"{executor}/nemo_launcher_prompt_learning_gpt.sh")
    (snapshot,) = folder.glob("squad_gpt3_5b_hydra-*.yaml")
    assert f"language_model_path: {NEMO}" in snapshot.read_text()


def test_tensor_parallel_form_is_refused_with_one_line_and_nothing_written(mounts):
    proc = run_in(mounts, BCP_TP2 + REDIRECT)
    log = on_host(mounts, LOG).read_text()
    assert proc.returncode == 2
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model_type 'gpt2'" in errors[0], log
    assert "set prompt_learning.model.tensor_model_parallel_size=1" in errors[0]
    assert not on_host(mounts, "/mount/results/gpt3_5b/prompt_learning_squad").exists()


CPU = ["prompt_learning.trainer.accelerator=cpu", "prompt_learning.trainer.devices=1", "prompt_learning.trainer.precision=32",
       "prompt_learning.trainer.max_steps=2", "prompt_learning.trainer.val_check_interval=2",
       "prompt_learning.trainer.enable_progress_bar=false", "prompt_learning.model.global_batch_size=2",
       "prompt_learning.model.micro_batch_size=2", "prompt_learning.model.p_tuning.encoder_hidden=16",
       "prompt_learning.model.data.max_seq_length=512", "prompt_learning.model.data.num_workers=0",
       "evaluation.trainer.accelerator=cpu", "evaluation.data.max_examples=2", "evaluation.data.batch_size=2",
       "evaluation.inference.tokens_to_generate=4", "evaluation.inference.progress=false",
       *MAIN_OVERRIDES]


@pytest.mark.slow
def test_bcp_command_line_runs_the_three_stages_on_the_nemo_fixture(mounts, tmp_path):
    """The BCP command (launcher_scripts_path: this checkout, where the code is; the NeMo launcher's own
    ``language_model_path`` default, not given) through the emulated bcprun, shrunk to CPU size."""
    command = ("python3 main.py prompt_learning=gpt3/squad evaluation=prompt_gpt3/squad "
               "stages=[data_preparation,prompt_learning,evaluation] cluster_type=bcp "
               f"launcher_scripts_path={ROOT} data_dir=/mount/data base_results_dir=/mount/results "
               "prompt_learning.run.model_train_name=gpt3_5b "
               f"prompt_learning.model.nemo_path={TUNED} " + " ".join(CPU) + REDIRECT)
    env = {"PATH": f"{FAKE_BIN}:{os.environ['PATH']}", "PROMPTLAUNCH_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = run_in(mounts, command, env=env, timeout=900)
    log = on_host(mounts, LOG).read_text()
    assert proc.returncode == 0, log[-4000:] + proc.stderr
    results = on_host(mounts, "/mount/results/gpt3_5b")
    artifact = json.loads((results / "prompt_learning_squad/results/prompt_artifact/artifact.json").read_text())
    assert artifact["base_model"]["language_model_path"] == NEMO
    assert artifact["base_model"]["model_type"] == "gpt2"
    tuned = on_host(mounts, TUNED)   # NeMo's nemo_path: the task's NeMo 1.20+ prompt file, copied where asked
    assert tuned.read_bytes() == (results / "prompt_learning_squad/results/prompt_artifact/export/nemo/squad.nemo").read_bytes()
    meta, templates, tables = nemo_prompts.load(tuned, "nemo_path")
    assert list(templates) == ["squad"] and tuple(tables["squad"].shape) == (10, 32)
    metrics = json.loads((results / "evaluation_squad/metrics.json").read_text())
    assert metrics["total"] == 2 and metrics["language_model_path"] == NEMO and 0.0 <= metrics["f1"] <= 100.0
    assert [p.name for p in (tmp_path / "cache").iterdir()][0].startswith("megatron_gpt-nemo-")
