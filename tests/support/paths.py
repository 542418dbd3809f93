"""Where things are: the repository root (tests import the package from it) and the test data folders."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"   # data: the tiny SQuAD-format files
GOLDEN = ROOT / "tests" / "golden"       # the golden rendered scripts
SUPPORT = ROOT / "tests" / "support"     # this package: helpers, fault_runner.py, fake_bcprun/
