"""Shared fixtures: a real uvicorn server on a free port running small real torchvision models.

The session service serves:
- ``resnet18`` from a generated checkpoint (random weights, saved under torchvision's file name),
  so tests can run the very same model locally for parity checks;
- ``alexnet`` with random weights (IMGCLS_ALLOW_RANDOM_WEIGHTS), which must say so;
- the four real pretrained CIFAR-10 ResNets from ../shared/data;
- two custom models from an IMGCLS_MODEL_CONFIG file: a copy of resnet18 and a 3-class resnet18.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from PIL import Image
from torchvision.models import get_model_builder

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLS_SHARED_DATA", ROOT.parent / "shared" / "data"))
IMAGES = SHARED / "images"
CIFAR_WEIGHTS = SHARED / "cifar10-resnets"
CIFAR_SAMPLE = SHARED / "cifar10-test-sample"
CIFAR_FILES = {
    "cifar10_resnet20": "resnet20-12fca82f.th",
    "cifar10_resnet32": "resnet32-d509ac18.th",
    "cifar10_resnet44": "resnet44-014dd654.th",
    "cifar10_resnet56": "resnet56-4bfd9763.th",
}
COMPOSE_SCHEMA = SHARED / "compose-spec.json"
SHARED_PARTS = (IMAGES, CIFAR_WEIGHTS, CIFAR_SAMPLE, COMPOSE_SCHEMA)

# ``@needs_shared`` (every part of ../shared/data) or ``@needs_shared(CIFAR_WEIGHTS, IMAGES)``
# (those paths): checked before the test's fixtures are set up, by require_shared().
needs_shared = pytest.mark.shared_data


def require_shared(*paths: Path) -> None:
    """Skip the test when shared data is missing, or fail it under ``CI=true``.

    A user's machine may lack ../shared/data, so a skip there says what is missing. CI always has
    it: there a missing file is a broken checkout or a moved file, and a skip would turn the tests
    that prove real predictions into silent passes.
    """
    missing = [p for p in paths or SHARED_PARTS if not p.exists()]
    if not missing:
        return
    names = ", ".join(str(p) for p in missing)
    if os.environ.get("CI") == "true":
        pytest.fail(f"shared test data missing under CI=true: {names}", pytrace=False)
    pytest.skip(f"shared test data not found: {names} (it sits beside the project in CI)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers(name="shared_data"):
        require_shared(*mark.args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    url: str
    settings: object
    app: object

    @property
    def service(self):  # the Service object, for tests that look at workers
        return self.app.state.service  # type: ignore[attr-defined]


@contextlib.contextmanager
def run_service(
    wait_ready: bool = True,
    timeout: float = 300,
    configure: Callable[[Any], None] | None = None,
    **settings_kw: object,
) -> Iterator[Running]:
    """A real uvicorn server in a thread on a free 127.0.0.1 port, app built from Settings
    (then given to ``configure``, for a route of a test's own)."""
    from app.limits import server_options
    from app.main import create_app
    from app.settings import Settings

    settings_kw.setdefault("auto_download", False)
    settings_kw.setdefault("device", "cpu")
    # fp32 eager keeps start-up fast; tests/test_fast_paths.py covers the reduced-precision default
    settings_kw.setdefault("precision", "fp32")
    settings_kw.setdefault("compile", False)
    # a fixed batch limit: the default (auto) times every model at load, for a second or more;
    # tests/test_batch_size.py serves it, and the servers started as `imgcls serve` use it
    settings_kw.setdefault("max_batch_size", 32)
    settings_kw.setdefault("log_level", "warning")
    settings_kw.setdefault("grpc_port", 0)  # no fixed port shared by parallel test servers
    settings = Settings(**settings_kw)  # type: ignore[arg-type]
    app = create_app(settings)
    if configure is not None:
        configure(app)
    port = free_port()
    # The same uvicorn options as `imgcls serve` (timeouts, header cap), quieter.
    options = {**server_options(settings), "log_level": "warning"}
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", **options)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("server thread exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.05)
        if wait_ready:
            wait_until_ready(url, timeout)
        yield Running(url, settings, app)
    finally:
        server.should_exit = True
        thread.join(60)


@contextlib.asynccontextmanager
async def ready_pool(configs: list[Any], name: str) -> AsyncIterator[Any]:
    """A started WorkerPool whose workers have ``name`` ready (within 2 minutes); closed on exit."""
    from app.engine.pool import WorkerPool

    pool = WorkerPool(configs)
    await pool.start()
    try:
        deadline = time.monotonic() + 120
        while not pool.ready_workers(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready on the workers")
            await asyncio.sleep(0.05)
        yield pool
    finally:
        await pool.close()


def wait_until_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=10)
        except httpx.TransportError as exc:  # not listening yet
            body = str(exc)
        else:
            if r.status_code == 200:
                return
            body = r.text
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready: {body}")


def children(pid: int) -> list[int]:
    """PIDs of a process's direct children."""
    import subprocess

    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def descendants(pid: int) -> list[int]:
    """PIDs of a process's children, theirs, and so on: a service's workers, which fork from
    multiprocessing's fork server (a child of the API process), with the server and the
    resource tracker."""
    found, todo = [], [pid]
    while todo:
        below = children(todo.pop())
        found += below
        todo += below
    return found


@contextlib.contextmanager
def log_records(name: str, level: int = logging.NOTSET) -> Iterator[list[logging.LogRecord]]:
    """The records that reach logger ``name`` (at ``level`` or above) while inside. A handler
    on the logger itself: imgcls's loggers do not propagate to the root once the service has
    configured its logging, so pytest's caplog does not see them."""
    records: list[logging.LogRecord] = []
    catch = logging.Handler(level)
    catch.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(catch)
    try:
        yield records
    finally:
        logger.removeHandler(catch)


def running(pids: list[int]) -> list[str]:
    """Those of ``pids`` still alive (zombies awaiting their reaper do not count), with names."""
    alive = []
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.append(f"{p} {Path(f'/proc/{p}/cmdline').read_bytes()[:120]!r}")
    return alive


def save_resnet18(path: Path, num_classes: int = 1000, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = get_model_builder("resnet18")(weights=None, num_classes=num_classes).eval()
    torch.save(model.state_dict(), path)
    return model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder: generated resnet18 checkpoint, custom models, links to CIFAR files."""
    d = tmp_path_factory.mktemp("weights")
    save_resnet18(d / "resnet18-f37072fd.pth")
    save_resnet18(d / "tiny3.pt", num_classes=3, seed=1)
    (d / "tiny3.txt").write_text("ok\nscratch\ndent\n")
    for f in CIFAR_FILES.values():
        if (CIFAR_WEIGHTS / f).is_file():
            os.symlink(CIFAR_WEIGHTS / f, d / f)
    (d / "models.toml").write_text(
        """
[models.r18_copy]
arch = "resnet18"
weights = "resnet18-f37072fd.pth"
labels = "imagenet.txt"
preprocess = "imagenet"

[models.tiny3]
arch = "resnet18"
weights = "tiny3.pt"
labels = "tiny3.txt"
preprocess = { resize = 160, crop = 128, interpolation = "bilinear" }
"""
    )
    from torchvision.models import ResNet18_Weights

    (d / "imagenet.txt").write_text("\n".join(ResNet18_Weights.DEFAULT.meta["categories"]) + "\n")
    return d


SESSION_MODELS = ["resnet18", "alexnet", *CIFAR_FILES, "r18_copy", "tiny3"]


@pytest.fixture(scope="session")
def service(model_dir: Path) -> Iterator[Running]:
    """The session's service. Without ../shared/data it serves the generated models only, so the
    tests that need no shared data still run; those that use a CIFAR model say so with
    ``@needs_shared(CIFAR_WEIGHTS)``."""
    models = [
        m for m in SESSION_MODELS if m not in CIFAR_FILES or (model_dir / CIFAR_FILES[m]).exists()
    ]
    with run_service(
        models=",".join(models),
        weights_dir=model_dir,
        allow_random_weights=True,
        model_config_file=model_dir / "models.toml",
        max_batch_size=8,
        max_batch_wait_ms=20,
        max_upload_mb=2,
        max_pixels=20_000_000,
    ) as running:
        yield running


@pytest.fixture
def client(service: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=120) as c:
        yield c


def image_bytes(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def shared_image(name: str) -> bytes:
    path = IMAGES / name
    require_shared(path)
    return path.read_bytes()


# ---- the page, in Debian's chromium driven by Playwright ----------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOTS = Path(os.environ.get("IMGCLS_ARTIFACTS", ROOT / "artifacts")) / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        why = "Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield b
        b.close()
