"""The installed wheel is what is tested: built from the source, installed outside the source tree,
and run from there (the CLI, every subcommand's help, the modules the CLI loads, a real service).

The wheel is installed with ``pip install --no-deps --target`` and run with PYTHONPATH pointing
there and a temporary working directory, so the source tree's ``app`` is not importable; this
interpreter's environment supplies the dependencies (installing torch again would take minutes).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import CIFAR_FILES, CIFAR_SAMPLE, CIFAR_WEIGHTS, ROOT, free_port, needs_shared

# What the build reads: pyproject.toml names README.md as the readme, and packages live in app/.
BUILD_INPUTS = ("pyproject.toml", "README.md", "app")


@dataclass
class Installed:
    wheel: Path
    site: Path  # the --target folder: packages, and the console script in bin/
    cwd: Path  # an empty working directory, away from the source tree
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from a copy of the source (no stale build/ or egg-info can leak in, and the
    source tree is not written to), then install it into a folder of its own."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    dist = base / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("imgcls-*.whl")
    site = base / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    cwd = base / "run"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGCLS_")}
    env["PYTHONPATH"] = str(site)
    return Installed(wheel, site, cwd, env)


def test_wheel_holds_every_module_and_the_page(installed: Installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    sources = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "app").rglob("*.py")
        if "__pycache__" not in p.parts
    )
    assert len(sources) > 30 and "app/benchmarks/harness.py" in sources
    missing = [s for s in sources if s not in names]
    assert not missing, f"not in {installed.wheel.name}: {missing}"
    for page in ("app/static/index.html", "app/static/app.js", "app/static/style.css"):
        assert page in names
    protos = [p.relative_to(ROOT).as_posix() for p in (ROOT / "app").rglob("*.proto")]
    assert [p for p in protos if p not in names] == []
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]


def test_installed_copy_is_the_one_imported(installed: Installed):
    """``app`` and every module the CLI's subcommands load come from the installed copy (not from
    the source tree, nor from an editable install of it)."""
    code = (
        "import sys, app, app.cli, app.main, app.evaluate, app.weights, app.catalog, "
        "app.benchmarks.harness\n"
        "for name, m in sorted(sys.modules.items()):\n"
        "    if name == 'app' or name.startswith('app.'):\n"
        "        print(name, m.__file__)\n"
    )
    r = installed.run(sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    files = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert {"app", "app.cli", "app.main", "app.benchmarks.harness"} <= set(files)
    outside = {n: f for n, f in files.items() if not Path(f).is_relative_to(installed.site)}
    assert not outside, f"imported from outside {installed.site}: {outside}"


HELP = [
    (),
    ("serve",),
    ("weights",),
    ("weights", "pull"),
    ("weights", "list"),
    ("eval",),
    ("bench",),
]


@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "imgcls")
def test_console_script_help(installed: Installed, command: tuple[str, ...]):
    """The ``imgcls`` script pip wrote from [project.scripts] answers --help for every command."""
    script = installed.site / "bin" / "imgcls"
    r = installed.run(str(script), *command, "--help")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"usage: {' '.join(('imgcls', *command))}"), r.stdout[:300]
    assert r.stderr == ""


def test_installed_bench_asks_for_photos_it_cannot_find(installed: Installed):
    """An installed copy has no shared photos beside it: ``imgcls bench`` says so in one line,
    before it runs anything (it died with a traceback after starting)."""
    script = installed.site / "bin" / "imgcls"
    r = installed.run(str(script), "bench", "--model", "cifar10_resnet20", "--servers", "imgcls")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("imgcls: --images: no folder of photos at"), r.stderr


@contextlib.contextmanager
def _serving(installed: Installed, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(installed.site / "bin" / "imgcls"), "serve"],
            cwd=installed.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _poll(url: str, deadline: float, proc: subprocess.Popen, log: Path) -> httpx.Response:
    """GET ``url`` until it answers 200 or ``deadline`` passes; the server must stay up."""
    last = "no answer"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited {proc.returncode}: {log.read_text()[-3000:]}"
        try:
            r = httpx.get(url, timeout=10)
        except httpx.TransportError as exc:
            last = repr(exc)
        else:
            if r.status_code == 200:
                return r
            last = f"{r.status_code} {r.text[:300]}"
        time.sleep(0.2)
    raise AssertionError(f"{url}: {last}; log: {log.read_text()[-3000:]}")


@needs_shared(CIFAR_WEIGHTS / CIFAR_FILES["cifar10_resnet20"], CIFAR_SAMPLE)
def test_installed_service_serves_and_stops(installed: Installed, tmp_path: Path):
    """``imgcls serve`` from the installed copy: healthy, ready, a real CIFAR-10 image classified
    by the real checkpoint, and a clean exit on SIGTERM."""
    weights = tmp_path / "weights"
    weights.mkdir()
    ckpt = CIFAR_FILES["cifar10_resnet20"]
    (weights / ckpt).symlink_to(CIFAR_WEIGHTS / ckpt)
    port = free_port()
    env = {
        **installed.env, "HOST": "127.0.0.1", "PORT": str(port),
        "IMGCLS_MODELS": "cifar10_resnet20", "IMGCLS_WEIGHTS_DIR": str(weights),
        "IMGCLS_AUTO_DOWNLOAD": "0", "IMGCLS_COMPILE": "0", "IMGCLS_PRECISION": "fp32",
        "IMGCLS_GRPC_PORT": "0",
        "IMGCLS_DEVICE": "cpu", "IMGCLS_LOG_LEVEL": "warning",
    }  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    image = sorted((CIFAR_SAMPLE / "ship").glob("*.jpg"))[0]
    with _serving(installed, env, log) as proc:
        deadline = time.monotonic() + 120
        assert _poll(f"{url}/healthz", deadline, proc, log).json() == {"status": "ok"}
        assert _poll(f"{url}/readyz", deadline, proc, log).json()["ready"] is True
        r = httpx.post(
            f"{url}/classify",
            params={"model": "cifar10_resnet20", "top_k": 10},
            files={"file": (image.name, image.read_bytes())},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "cifar10_resnet20" and body["weights"] == ckpt
        labels = sorted(p["label"] for p in body["predictions"])
        assert labels == sorted(p.name for p in CIFAR_SAMPLE.iterdir() if p.is_dir())
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then may re-raise the signal for its supervisor
        assert proc.wait(60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


DEV_ONLY = ("pytest", "ruff", "mypy", "playwright", "locust", "schemathesis", "ray")


def test_make_serve_installs_the_runtime_dependencies_only(tmp_path: Path):
    """``make serve`` installs the package without the dev extra; ``make test`` with it. Read from
    ``make -n`` with a virtualenv that does not exist yet (a fresh machine), so nothing runs."""

    def plan(target: str) -> list[str]:
        r = subprocess.run(
            ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return [line for line in r.stdout.splitlines() if "pip install" in line]

    serve, test = plan("serve"), plan("test")
    assert serve and all(line.endswith(" -e .") for line in serve), serve
    assert test and all(line.endswith(" -e '.[dev]'") for line in test), test
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower() for d in runtime}
    assert {"torch", "fastapi", "uvicorn"} <= names and not names & set(DEV_ONLY), names
