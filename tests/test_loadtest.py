"""The locustfile runs: a short headless locust run against the session's real service."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import CIFAR_WEIGHTS, IMAGES, ROOT, needs_shared, run_service

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


def _locust(url: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    locust = shutil.which("locust") or str(Path(sys.executable).parent / "locust")
    env = {**os.environ, "IMGCLS_LOADTEST_IMAGES": str(IMAGES), **env}
    env.pop("IMGCLS_LOADTEST_MODELS", None)  # learnt from /models
    return subprocess.run(
        [locust, "-f", "loadtest/locustfile.py", "--headless", "--host", url, "--users", "2",
         "--spawn-rate", "2", "--run-time", "20s", "--stop-timeout", "5", "--csv",
         str(tmp_path / "stats"), "--only-summary"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip


def test_locust_sends_the_api_key_and_stops_at_once_when_refused(tmp_path: Path):
    """Against a service with IMGCLS_API_KEY: the same variable makes every request carry the
    key (no failures); a wrong key stops the run at once with the reason and exit code 1, not
    after --run-time of tracebacks (it used to run its whole time on an empty model list)."""
    key = "loadtest-key"
    with run_service(models="cifar10_resnet20", weights_dir=CIFAR_WEIGHTS, api_key=key) as svc:
        r = _locust(svc.url, tmp_path, IMGCLS_API_KEY=key)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = {row["Name"]: row for row in csv.DictReader((tmp_path / "stats_stats.csv").open())}
        assert int(rows["Aggregated"]["Request Count"]) > 3
        assert int(rows["Aggregated"]["Failure Count"]) == 0
        t0 = time.monotonic()
        r = _locust(svc.url, tmp_path, IMGCLS_API_KEY="not-the-key")
        took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "answered 401" in out and "IndexError" not in out, out[-3000:]
    assert took < 15  # well before the 20 s run time
