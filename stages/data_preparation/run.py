"""Entry point of the data_preparation stage: ``python3 -u stages/data_preparation/run.py --config <yaml>``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a clone without install
from stages.common.entry import run_stage  # noqa: E402
from stages.data_preparation.squad import prepare  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_stage(prepare))
