"""Shared data that is missing skips a test on a user's machine and fails it under CI=true.

A tiny pytest run in a subprocess, with IMGCLS_SHARED_DATA pointing to an empty folder and
tests/conftest.py loaded as a plugin, so the real helpers decide.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROBE = """
from pathlib import Path

from tests.conftest import IMAGES, needs_shared, shared_image


@needs_shared
def test_whole_folder():
    pass


@needs_shared(IMAGES)
def test_named_folder():
    pass


def test_shared_image():
    shared_image("chelsea.png")


@needs_shared(Path(__file__))
def test_present_path():
    pass


def test_no_shared_data():
    pass
"""


def _outcomes(tmp_path: Path, ci: str | None) -> tuple[int, dict[str, tuple[str, str]]]:
    """Exit status and, per test, (outcome, message) from the run's JUnit XML."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["IMGCLS_SHARED_DATA"] = str(tmp_path / "empty")
    if ci is not None:
        env["CI"] = ci
    report = tmp_path / "report.xml"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "--junitxml", str(report), "-q", str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert report.is_file(), r.stdout + r.stderr
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        child = next(iter(case), None)
        tag = child.tag if child is not None and child.tag != "system-out" else "passed"
        out[case.get("name", "")] = (tag, child.get("message", "") if child is not None else "")
    return r.returncode, out


NEEDING = ("test_whole_folder", "test_named_folder", "test_shared_image")


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_shared_data_skips_outside_ci(tmp_path, ci):
    code, out = _outcomes(tmp_path, ci)
    assert code == 0, out
    for name in NEEDING:
        tag, message = out[name]
        assert tag == "skipped", (name, out[name])
        assert str(tmp_path / "empty") in message, message  # says what is missing
    assert out["test_present_path"][0] == out["test_no_shared_data"][0] == "passed", out


def test_missing_shared_data_fails_under_ci(tmp_path):
    code, out = _outcomes(tmp_path, "true")
    assert code == 1, out
    for name in NEEDING:
        tag, message = out[name]
        # a marked test fails in its setup (JUnit "error"), shared_image() in its body ("failure")
        assert tag in ("error", "failure"), (name, out[name])
        assert "CI=true" in message and str(tmp_path / "empty") in message, message
    assert out["test_present_path"][0] == out["test_no_shared_data"][0] == "passed", out
