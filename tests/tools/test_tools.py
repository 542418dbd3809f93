"""tools/: the lock agrees with pyproject.toml's ranges, and the drift check reads pytest's junit report right."""
from __future__ import annotations

import sys

import pytest

from tests.support.paths import ROOT

sys.path.insert(0, str(ROOT / "tools"))

import drift  # noqa: E402
import lock  # noqa: E402


def declared() -> list:
    """Every requirement of pyproject.toml that the lock resolves: the dependencies and the extras it names."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in lock.EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_lock_pins_every_declared_dependency_inside_its_range():
    pins = lock.read_pins()
    for req in declared():
        name = lock.normalise(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not in requirements/lock.txt: run tools/lock.py compile"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock has {name}=={pins[name]}, outside {req}"


def test_lock_honours_its_holds():
    holds = lock.read_pins(lock.HOLD)
    assert holds and all(lock.read_pins()[name] == version for name, version in holds.items())


def test_lock_check_names_what_differs(monkeypatch, capsys):
    from importlib import metadata

    have = {"torch": "2.13.0+cpu", "transformers": "5.25.0"}
    monkeypatch.setattr(lock, "read_pins", lambda path=lock.LOCK: {"torch": "2.13.0+cpu", "transformers": "5.23.0", "gone": "1.0"})

    def version(name):
        if name not in have:
            raise metadata.PackageNotFoundError(name)
        return have[name]

    monkeypatch.setattr(lock.metadata, "version", version)
    assert lock.check_installed() == 1
    out, err = capsys.readouterr()
    assert "transformers==5.25.0   <- the lock says 5.23.0" in out and "gone==(not installed)" in out
    assert "torch==2.13.0+cpu\n" in out and "3 locked packages, 2 different" in out
    assert err.startswith("error: installed versions differ from requirements/lock.txt for gone, transformers;")


def test_drift_lists_failed_and_errored_tests_from_junit(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad[generate]"><failure message="AssertionError: 6 == 2">x</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_setup"><error message="fixture failed&#10;more">y</error></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="no slurm"/></testcase>'
        "</testsuite></testsuites>", encoding="utf-8")
    assert drift.failures(report) == [("tests/test_a.py::test_bad[generate]", "AssertionError: 6 == 2"),
                                      ("tests/test_b.py::test_setup", "fixture failed")]


def test_drift_lists_packages_that_moved_past_the_lock(monkeypatch):
    monkeypatch.setattr(lock, "read_pins", lambda path=lock.LOCK: {"peft": "0.21.2", "transformers": "5.23.0", "x": "1"})
    assert drift.moved({"peft": "0.21.2", "transformers": "5.25.0"}) == [("transformers", "5.23.0", "5.25.0"), ("x", "1", "(absent)")]


@pytest.mark.parametrize("argv", [["--torch", "nightly"]])
def test_drift_refuses_an_unknown_torch_choice(argv):
    with pytest.raises(SystemExit) as exc:
        drift.main(argv)
    assert exc.value.code == 2
