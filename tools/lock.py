"""The lock of known-good versions (requirements/lock.txt): refresh it, and check an environment against it.

Why: ``pyproject.toml`` keeps honest ranges for people who install promptlaunch into their own environment, but
a range lets a fresh machine pull whatever was released last night (transformers 5.25.0 broke PEFT's
prompt-tuning ``generate`` and changed torch.compile's graph count). CI and the README install exactly the
lock, and ``check`` proves it: it prints the versions in use and fails when any of them differs from the lock.

    python3 tools/lock.py compile   # re-resolve pyproject.toml (extras: test) under requirements/hold.txt with uv
    python3 tools/lock.py check     # print the locked packages as installed; exit 1 on a difference
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
HOLD = ROOT / "requirements" / "hold.txt"
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
EXTRAS = ("test",)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def read_pins(path: Path = LOCK) -> dict[str, str]:
    """``name -> version`` for every ``name==version`` line (names normalised as pip does)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def compile_lock(find_links: list[str]) -> int:
    """Resolve with uv (a real resolver, not a hand-written list) and write the lock in place."""
    uv = shutil.which("uv")
    if uv is None:
        print("error: uv is not installed; run `pip install uv` and retry", file=sys.stderr)
        return 2
    cmd = [uv, "pip", "compile", str(ROOT / "pyproject.toml"), "--constraint", str(HOLD),
           "--python-version", PYTHON, "--python-platform", PLATFORM, "--quiet",
           "--custom-compile-command", "python3 tools/lock.py compile", "-o", str(LOCK)]
    for extra in EXTRAS:
        cmd += ["--extra", extra]
    for place in find_links:
        cmd += ["--find-links", place]
    return subprocess.run(cmd, cwd=ROOT).returncode


def check_installed() -> int:
    """Print every locked package with its installed version; exit 1 when one is missing or differs."""
    wrong = []
    for name, want in sorted(read_pins().items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "(not installed)"
        mark = "" if have == want else f"   <- the lock says {want}"
        if mark:
            wrong.append(name)
        print(f"{name}=={have}{mark}")
    print(f"python {sys.version.split()[0]}; {len(read_pins())} locked packages, {len(wrong)} different")
    if wrong:
        print(f"error: installed versions differ from {LOCK.relative_to(ROOT)} for {', '.join(wrong)}; "
              f"install with `pip install -r requirements/lock.txt -e \".[test]\"`", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="re-resolve requirements/lock.txt with uv")
    comp.add_argument("--find-links", action="append", default=[],
                      help="a folder or page with the torch CPU wheel (e.g. /opt/wheels, or PyTorch's CPU index page)")
    sub.add_parser("check", help="print the locked packages as installed; exit 1 on a difference")
    args = parser.parse_args(argv)
    if args.command == "compile":
        return compile_lock(args.find_links)
    return check_installed()


if __name__ == "__main__":
    sys.exit(main())
