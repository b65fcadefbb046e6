"""Real predictions, proven: the real CIFAR-10 ResNets reach their reference accuracy over HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import subprocess
import sys

import httpx
import pytest

from app.evaluate import list_images
from tests.conftest import (
    CIFAR_FILES,
    CIFAR_SAMPLE,
    CIFAR_WEIGHTS,
    ROOT,
    free_port,
    needs_shared,
    run_service,
)

pytestmark = needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)

# ../shared/data/cifar10-resnets/NOTES.md: independent evaluation on cifar10-test-sample
REFERENCE = {
    "cifar10_resnet20": (80.40, 99.00),
    "cifar10_resnet32": (84.00, 99.20),
    "cifar10_resnet44": (82.10, 98.80),
    "cifar10_resnet56": (82.50, 99.30),
}


async def _accuracy(url: str, model: str) -> tuple[float, float, int]:
    items = list_images(CIFAR_SAMPLE)
    sem = asyncio.Semaphore(16)
    top1 = top5 = 0

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(path, label) -> None:
            nonlocal top1, top5
            async with sem:
                r = await client.post(
                    "/classify",
                    params={"model": model, "top_k": 5},
                    files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                )
            assert r.status_code == 200, r.text
            labels = [p["label"] for p in r.json()["predictions"]]
            top1 += labels[0] == label
            top5 += label in labels

        await asyncio.gather(*(one(p, lab) for p, lab in items))
    n = len(items)
    return 100.0 * top1 / n, 100.0 * top5 / n, n


@pytest.fixture(scope="module")
def measured(service):
    return {m: asyncio.run(_accuracy(service.url, m)) for m in CIFAR_FILES}


@pytest.mark.parametrize("model", list(REFERENCE))
def test_reference_accuracy_within_half_a_point(measured, model):
    top1, top5, n = measured[model]
    ref1, ref5 = REFERENCE[model]
    assert n == 1000
    assert abs(top1 - ref1) <= 0.5, f"{model}: top-1 {top1:.2f} vs reference {ref1:.2f}"
    assert abs(top5 - ref5) <= 0.5, f"{model}: top-5 {top5:.2f} vs reference {ref5:.2f}"


def test_imgcls_eval_reports_the_same_numbers(service, measured, tmp_path):
    """``imgcls eval`` counts what the requests above counted, on the shallowest and the deepest
    net (each is 1,000 more requests; the other two add no path of their own)."""
    out = tmp_path / "report"
    models = ["cifar10_resnet20", "cifar10_resnet56"]
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "eval", "--data", str(CIFAR_SAMPLE),
         "--models", ",".join(models), "--url", service.url, "--concurrency", "8",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {m["model"]: m for m in report["models"]}
    assert sorted(rows) == models
    for model in models:
        top1, top5, n = measured[model]
        assert rows[model]["images"] == n
        assert rows[model]["top1"] == pytest.approx(top1, abs=1e-9)
        assert rows[model]["top5"] == pytest.approx(top5, abs=1e-9)
        assert rows[model]["family"] == "resnet" and rows[model]["images_per_s"] > 0
        assert rows[model]["p50_ms"] <= rows[model]["p95_ms"] <= rows[model]["p99_ms"]
    md = (out / "report.md").read_text()
    assert "| cifar10_resnet56 | resnet | 56 |" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_eval_rejects_folders_that_are_not_labels(service, tmp_path):
    (tmp_path / "data" / "not_a_cifar_class").mkdir(parents=True)
    src = next(CIFAR_SAMPLE.glob("cat/*.jpg"))
    (tmp_path / "data" / "not_a_cifar_class" / "x.jpg").write_bytes(src.read_bytes())
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "eval", "--data", str(tmp_path / "data"),
         "--models", "cifar10_resnet20", "--url", service.url, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and "not_a_cifar_class" in r.stderr


def test_imgcls_eval_without_url_starts_the_service_in_process(tmp_path):
    data = tmp_path / "data"
    for cls in ("cat", "ship"):
        (data / cls).mkdir(parents=True)
        for src in sorted((CIFAR_SAMPLE / cls).glob("*.jpg"))[:5]:
            (data / cls / src.name).write_bytes(src.read_bytes())
    (data / "cat" / "._0000.jpg").write_bytes(b"\0\5\22\7")  # a macOS resource fork: ignored
    (data / "ship" / "broken.jpg").write_bytes(b"not a picture")  # refused by the service: left out
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "resnet20-12fca82f.th").symlink_to(CIFAR_WEIGHTS / "resnet20-12fca82f.th")
    env = {**os.environ, "IMGCLS_WEIGHTS_DIR": str(weights), "IMGCLS_AUTO_DOWNLOAD": "0",
           "IMGCLS_PRECISION": "fp32", "IMGCLS_COMPILE": "0", "IMGCLS_LOG_LEVEL": "warning"}  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "eval", "--data", str(data), "--models", "cifar10_resnet20",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["meta"]["url"] == "in-process service"
    (row,) = report["models"]
    assert row["images"] == 10 and row["top1"] >= 50.0  # real weights: most of these are right
    assert row["skipped"] == 1 and "1 files refused and left out" in r.stdout
    assert row["skipped_examples"][0].startswith("broken.jpg: HTTP 400:")


def test_eval_mistakes_are_one_line_not_a_traceback(service, tmp_path):
    """What a user gets wrong (or a service that cannot answer) ends `imgcls eval` with one
    line and exit 2, quickly: no traceback, no ten-minute wait for a model that cannot load,
    and no empty reports folder left behind."""
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    good = tmp_path / "good"
    (good / "cat").mkdir(parents=True)
    src = next(CIFAR_SAMPLE.glob("cat/*.jpg"))
    (good / "cat" / "x.jpg").write_bytes(src.read_bytes())
    (tmp_path / "a-file").write_text("")
    nothing = tmp_path / "no-weights"
    nothing.mkdir()
    url = ["--url", service.url]
    cases = {
        "no images": ([*url, "--data", str(empty), "--models", "cifar10_resnet20"], "hold no images"),
        "service down": (["--url", f"http://127.0.0.1:{free_port()}", "--data", str(good),
                          "--models", "cifar10_resnet20"], "cannot reach"),
        "out is a file": ([*url, "--data", str(good), "--models", "cifar10_resnet20", "--out",
                           str(tmp_path / "a-file")], "is a file"),
        "not served": ([*url, "--data", str(good), "--models", "vgg19"], "is not-loaded"),
        "unknown, in-process": (["--data", str(good), "--models", "nope"], "unknown model 'nope'"),
        "no weights, in-process": (["--data", str(good), "--models", "cifar10_resnet20"],
                                   "cannot be served"),
    }  # fmt: skip
    env = {**os.environ, "IMGCLS_WEIGHTS_DIR": str(nothing), "IMGCLS_AUTO_DOWNLOAD": "0",
           "IMGCLS_PRECISION": "fp32", "IMGCLS_COMPILE": "0", "IMGCLS_LOG_LEVEL": "warning"}  # fmt: skip

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "eval", "--out", str(tmp_path / "o"), *args],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=240,
        )  # fmt: skip

    with cf.ThreadPoolExecutor(3) as ex:
        runs = {name: ex.submit(run, args) for name, (args, _) in cases.items()}
        results = {name: f.result() for name, f in runs.items()}
    for name, r in results.items():
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
        assert cases[name][1] in r.stderr and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
    assert not (tmp_path / "o").exists(), "a refused eval left its --out folder"


def test_eval_waits_out_a_busy_service(tmp_path):
    """A service whose queue is full answers 503 with Retry-After: `imgcls eval` retries those
    images as told (it ended the whole run on the first 503), and every image is counted once.
    The service has an API key, which eval sends from IMGCLS_API_KEY. A model named twice is
    evaluated once; images in folders below a class's are its too, each folder read once (a
    link back up made a loop)."""
    from prometheus_client.parser import text_string_to_metric_families

    data = tmp_path / "data"
    for cls in ("cat", "ship", "dog", "frog"):
        (data / cls / "more").mkdir(parents=True)
        for i, src in enumerate(sorted((CIFAR_SAMPLE / cls).glob("*.jpg"))[:6]):
            below = data / cls / ("more" if i % 2 else "")  # found at any depth, as ImageFolder
            (below / src.name).write_bytes(src.read_bytes())
        (data / cls / "more" / "up").symlink_to(data / cls)  # a loop: each folder read once
    key = "eval-key"  # a service with an API key: the same variable gives it to eval
    with run_service(models="cifar10_resnet20", weights_dir=CIFAR_WEIGHTS, max_queue=1,
                     max_batch_size=1, api_key=key) as svc:  # fmt: skip
        r = subprocess.run(
            [sys.executable, "-m", "app.cli", "eval", "--data", str(data), "--models",
             "cifar10_resnet20, cifar10_resnet20", "--url", svc.url, "--concurrency", "8", "--out",
             str(tmp_path / "out")],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
            env={**os.environ, "IMGCLS_API_KEY": key + "\n"},  # from a file: read as the service does
        )  # fmt: skip
        metrics = httpx.get(f"{svc.url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    busy = sum(
        s.value
        for f in text_string_to_metric_families(metrics)
        if f.name == "imgcls_requests"
        for s in f.samples
        if s.name == "imgcls_requests_total" and s.labels["status"] == "503"
    )
    assert busy > 0  # the queue of one was full for some of the 8 clients' images
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads((tmp_path / "out" / "report.json").read_text())["models"]
    assert row["images"] == 24 and row["skipped"] == 0


def test_eval_cut_short_keeps_the_models_it_finished(tmp_path):
    """A run that stops on a later model (a fault of the service, Ctrl-C) writes the report of
    the models it finished, marked incomplete with the reason and what was not evaluated, and
    says so in one line (it wrote nothing: hours of measurement lost to the last model)."""
    import signal
    import threading

    from starlette.responses import JSONResponse

    data = tmp_path / "data"
    for cls in ("cat", "ship", "dog", "frog"):
        (data / cls).mkdir(parents=True)
        for src in sorted((CIFAR_SAMPLE / cls).glob("*.jpg"))[:3]:
            (data / cls / src.name).write_bytes(src.read_bytes())
    on_44 = threading.Event()

    def configure(app) -> None:  # cifar10_resnet32 fails; cifar10_resnet44 answers slowly
        @app.middleware("http")
        async def fault(request, call_next):
            model = request.query_params.get("model")
            if request.url.path == "/classify" and model == "cifar10_resnet32":
                return JSONResponse({"detail": "a fault of the service"}, status_code=500)
            if request.url.path == "/classify" and model == "cifar10_resnet44":
                on_44.set()
                await asyncio.sleep(0.5)
            return await call_next(request)

    def command(models: str, out: str) -> list[str]:
        # Ctrl-C as in a terminal: a process started in the background by a shell without job
        # control (a CI runner's) inherits SIGINT ignored, and Python then leaves it so
        interactive = (
            "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
            " sys.argv[0] = 'imgcls'; runpy.run_module('app.cli', run_name='__main__')"
        )
        return [sys.executable, "-c", interactive, "eval", "--data", str(data), "--models", models,
                "--url", svc.url, "--concurrency", "2", "--out", str(tmp_path / out)]  # fmt: skip

    def kept(out: str) -> dict:
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert [m["model"] for m in report["models"]] == ["cifar10_resnet20"]
        assert report["models"][0]["images"] == 12 and report["meta"]["complete"] is False
        assert "Incomplete" in (tmp_path / out / "report.md").read_text()
        assert (tmp_path / out / "report.png").stat().st_size > 0
        return report["meta"]["incomplete"]

    with run_service(models="cifar10_resnet20,cifar10_resnet32,cifar10_resnet44",
                     weights_dir=CIFAR_WEIGHTS, configure=configure) as svc:  # fmt: skip
        failed = subprocess.run(
            command("cifar10_resnet20,cifar10_resnet32,cifar10_resnet44", "failed"),
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        with subprocess.Popen(
            command("cifar10_resnet20,cifar10_resnet44", "stopped"),
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
        ) as stopped:  # fmt: skip
            assert on_44.wait(240), "eval never reached the second model"
            stopped.send_signal(signal.SIGINT)  # Ctrl-C
            _, stopped_err = stopped.communicate(timeout=120)

    assert failed.returncode == 2, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert "HTTP 500" in last and "the report of cifar10_resnet20 is in" in last, last
    assert "Traceback" not in failed.stderr
    cut = kept("failed")
    assert "HTTP 500" in cut["reason"]
    assert cut["not_evaluated"] == ["cifar10_resnet32", "cifar10_resnet44"]

    assert stopped.returncode == 130, stopped_err[-2000:]
    last = stopped_err.strip().splitlines()[-1]
    assert last.startswith("imgcls: interrupted; the report of cifar10_resnet20"), last
    assert "Traceback" not in stopped_err
    assert kept("stopped") == {"reason": "interrupted", "not_evaluated": ["cifar10_resnet44"]}
