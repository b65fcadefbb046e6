"""The locustfile runs: a short headless locust run against the session's real service."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import CIFAR_WEIGHTS, IMAGES, ROOT, needs_shared

pytestmark = needs_shared(IMAGES, CIFAR_WEIGHTS)


def test_locustfile_headless_run(service, tmp_path: Path):
    locust = shutil.which("locust") or str(Path(sys.executable).parent / "locust")
    env = {**os.environ, "IMGCLS_LOADTEST_IMAGES": str(IMAGES),
           "IMGCLS_LOADTEST_MODELS": "cifar10_resnet20,cifar10_resnet32,resnet18"}  # fmt: skip
    r = subprocess.run(
        [locust, "-f", "loadtest/locustfile.py", "--headless", "--host", service.url,
         "--users", "4", "--spawn-rate", "4", "--run-time", "6s", "--stop-timeout", "5",
         "--csv", str(tmp_path / "stats"), "--html", str(tmp_path / "report.html"), "--only-summary"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader((tmp_path / "stats_stats.csv").open())}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 5 and int(total["Failure Count"]) == 0
    assert any(name.startswith("/classify") for name in rows)
    assert (tmp_path / "report.html").stat().st_size > 1000
