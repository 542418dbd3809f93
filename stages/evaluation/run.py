"""Entry point of the evaluation stage: ``python3 -u stages/evaluation/run.py --config <name>_hydra.yaml``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a clone without install
from stages.common.entry import run_stage  # noqa: E402
from stages.evaluation.evaluate import evaluate  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_stage(evaluate))
