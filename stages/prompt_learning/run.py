"""Prompt learning stage: ``python3 -u stages/prompt_learning/run.py --config <results_dir>/<name>_hydra.yaml``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a clone without install
from stages.common.entry import run_stage  # noqa: E402
from stages.prompt_learning.train import train  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_stage(train))
