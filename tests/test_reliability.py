"""Load, overload, deadlines, graceful shutdown and security, against real services."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import images
from tests.conftest import ROOT, descendants, free_port, log_records, run_service, running
from tests.rawhttp import connect, read_until_closed, status_of

PNG = images.encode(images.photo((64, 64)), "PNG")


def _post(
    url: str, model: str, timeout: float = 60, headers: dict[str, str] | None = None
) -> tuple[int, float, httpx.Headers]:
    t0 = time.perf_counter()
    try:
        r = httpx.post(
            f"{url}/classify",
            params={"model": model},
            files={"file": ("x.png", PNG)},
            headers=headers,
            timeout=timeout,
        )
    except httpx.TimeoutException:
        return -1, time.perf_counter() - t0, httpx.Headers()
    return r.status_code, time.perf_counter() - t0, r.headers


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``condition`` (polled), or fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


def test_full_queue_answers_503_at_once(tmp_path: Path):
    with run_service(
        models="cifar10_plain110", allow_random_weights=True, weights_dir=tmp_path,
        max_queue=4, max_batch_size=2, threads_per_worker=1,
    ) as svc:  # fmt: skip
        with cf.ThreadPoolExecutor(48) as ex:
            results = list(ex.map(lambda _: _post(svc.url, "cifar10_plain110"), range(96)))
        codes = [c for c, _, _ in results]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) > 0 and codes.count(200) > 0
        refused = [(t, h) for c, t, h in results if c == 503]
        assert all(h.get("Retry-After") for _, h in refused)
        assert np.median([t for t, _ in refused]) < np.median(
            [t for c, t, _ in results if c == 200]
        )


def test_deadline_gives_504_and_drops_unstarted_work(tmp_path: Path):
    with run_service(
        models="cifar10_plain110", allow_random_weights=True, weights_dir=tmp_path,
        request_timeout_s=0.25, max_batch_size=4, threads_per_worker=1,
    ) as svc:  # fmt: skip
        n = 64
        with cf.ThreadPoolExecutor(32) as ex:
            codes = [
                c for c, _, _ in ex.map(lambda _: _post(svc.url, "cifar10_plain110"), range(n))
            ]
        assert set(codes) <= {200, 504}, codes
        assert codes.count(504) > 0
        # the batches already at the worker finish after their clients got 504: wait for them
        pool, batcher = svc.service.pool, svc.service.batchers["cifar10_plain110"]
        _until(
            lambda: batcher.depth == 0 and not any(w.inflight for w in pool.workers),
            60, "the queue and the worker drained",
        )  # fmt: skip
        computed = _metric(svc.url, "imgcls_batch_size_sum", model="cifar10_plain110")
        dropped = _metric(svc.url, "imgcls_dropped_images_total", model="cifar10_plain110")
        # every client here waits for its answer: the images dropped are the deadline's
        assert dropped > 0 and dropped == _metric(
            svc.url, "imgcls_dropped_images_total", model="cifar10_plain110", reason="deadline"
        )
        assert computed < n, f"{computed} images computed for {n} requests"


def test_a_client_gone_after_its_upload_has_its_image_dropped_and_counted_499(tmp_path: Path):
    """Clients that send their upload and leave before the answer (a timeout, a closed tab):
    their images, still waiting for a batch, are dropped rather than computed for nobody, and
    the requests counted 499 (they were computed and counted 200). A client that stays gets its
    answer from the same queue."""
    from tests.rawhttp import multipart

    model = "cifar10_plain20"
    body = multipart(PNG)
    head = (f"POST /classify?model={model} HTTP/1.1\r\nHost: t\r\n"
            f"Content-Type: multipart/form-data; boundary=imgclsboundary\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with run_service(
        models=model, allow_random_weights=True, weights_dir=tmp_path,
        max_batch_size=32, max_batch_wait_ms=5000,  # the batch waits for more: 5 s
    ) as svc:  # fmt: skip
        batcher = svc.service.batchers[model]
        socks = [connect(svc.url) for _ in range(3)]
        for sock in socks:
            sock.sendall(head + body)
        _until(lambda: batcher.depth == 3, 10, "three images queued")
        for sock in socks:
            sock.close()  # gone, before the batch's wait ends
        _until(lambda: _metric(svc.url, "imgcls_requests_total", status="499") == 3, 10,
               "three requests counted 499")  # fmt: skip
        assert _post(svc.url, model)[0] == 200  # one that waits: answered, the others dropped
        assert _metric(svc.url, "imgcls_dropped_images_total", model=model, reason="cancelled") == 3
        assert _metric(svc.url, "imgcls_batch_size_sum", model=model) == 1  # only its image ran
        assert _metric(svc.url, "imgcls_requests_total", status="200", endpoint="/classify") == 1


def test_overload_stays_bounded_and_recovers(tmp_path: Path):
    """Several times the capacity for a bounded time: every request ends with 200, 503 or 504;
    accepted requests keep a bounded p99; right after, the service is back to full speed."""
    timeout_s = 2.0
    with run_service(
        models="cifar10_plain56", allow_random_weights=True, weights_dir=tmp_path,
        request_timeout_s=timeout_s, max_queue=8, max_batch_size=16,
    ) as svc:  # fmt: skip
        # 64 clients against at most 2 x 16 images at the worker (one batch running, one full one
        # waiting) plus 8 queued: more than the service holds, so the queue bound is exercised.
        model = "cifar10_plain56"

        def sequential(k: int) -> float:
            return float(np.median([_post(svc.url, model)[1] for _ in range(k)]))

        before = sequential(20)
        stop_at = time.monotonic() + 8.0

        def hammer(_: int) -> list[tuple[int, float]]:
            out = []
            with httpx.Client(timeout=30) as c:
                while time.monotonic() < stop_at:
                    t0 = time.perf_counter()
                    r = c.post(
                        f"{svc.url}/classify",
                        params={"model": model},
                        files={"file": ("x.png", PNG)},
                    )
                    out.append((r.status_code, time.perf_counter() - t0))
            return out

        with cf.ThreadPoolExecutor(64) as ex:
            results = [x for part in ex.map(hammer, range(64)) for x in part]
        codes = {c for c, _ in results}
        assert codes <= {200, 503, 504}, codes
        ok = [t for c, t in results if c == 200]
        assert (len(ok) > 0 and len(results) > 2 * len(ok)) or 503 in codes
        assert float(np.percentile(ok, 99)) < timeout_s + 1.5
        after = sequential(20)
        print(f"overload: {len(results)} requests, {len(ok)} accepted, statuses {sorted(codes)}, "
              f"p50 before {before * 1000:.1f} ms, after {after * 1000:.1f} ms")  # fmt: skip
        assert after < 3 * before + 0.05


@pytest.mark.parametrize("to", ["process", "group"])
def test_graceful_shutdown_finishes_in_flight_work(tmp_path: Path, to: str):
    """SIGTERM to the API process, or to its whole process group (Ctrl-C in a terminal,
    systemd's default stop, ``kill -- -PGID``): accepted requests are answered, the workers
    are stopped by the server, not killed by the signal (their batches failed with 503 and
    they were restarted during the shutdown)."""
    port = free_port()
    env = {
        **os.environ, "IMGCLS_MODELS": "cifar10_plain110", "IMGCLS_ALLOW_RANDOM_WEIGHTS": "1",
        "IMGCLS_AUTO_DOWNLOAD": "0", "IMGCLS_WEIGHTS_DIR": str(tmp_path),
        "IMGCLS_PRECISION": "fp32",
        "IMGCLS_COMPILE": "0", "IMGCLS_MAX_BATCH_SIZE": "2", "IMGCLS_THREADS_PER_WORKER": "1",
        "IMGCLS_SHUTDOWN_GRACE_S": "30", "PORT": str(port), "IMGCLS_GRPC_PORT": "0",
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("wb"),
        start_new_session=True,  # a process group of its own, as under a terminal or systemd
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        from tests.conftest import wait_until_ready

        wait_until_ready(url, 120)
        workers = descendants(proc.pid)
        assert len(workers) >= 2, "the fork server and the worker should be below the server"
        with cf.ThreadPoolExecutor(16) as ex:
            futures = [ex.submit(_post, url, "cifar10_plain110") for _ in range(16)]
            # SIGTERM once all 16 are at the server: queued (imgcls_queue_depth), answered, or
            # at the worker, which holds at most two batches of 2 (one running, one waiting)
            _until(
                lambda: _metric(url, "imgcls_queue_depth", model="cifar10_plain110")
                + _metric(url, "imgcls_requests_total", endpoint="/classify")
                >= 16 - 2 * 2,
                60, "the requests reached the server",
            )  # fmt: skip
            if to == "group":
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGTERM)
            codes = [f.result()[0] for f in futures]
        assert codes == [200] * 16, codes
        # uvicorn shuts down gracefully, then re-raises the signal for its supervisor: exit status
        # is 0 or "terminated by SIGTERM", after the lifespan shutdown completed
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = (tmp_path / "server.log").read_text()
        assert "Application shutdown complete" in log
        assert "restarting" not in log and "died" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        # one JSON line per request, with request_id, model, status and latency
        import json

        entries = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
        requests = [e for e in entries if e.get("logger") == "imgcls.access"]
        assert len(requests) == 16
        assert all(e["status"] == 200 and e["model"] == "cifar10_plain110" for e in requests)
        assert all(len(e["request_id"]) == 32 and e["latency_ms"] > 0 for e in requests)
        deadline = time.monotonic() + 10  # the multiprocessing resource tracker exits last
        while running(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(workers), f"left running: {running(workers)}"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_end_with_a_killed_server(tmp_path: Path):
    """The API process killed outright (SIGKILL, the OOM killer): its workers (and the fork
    server they were forked from) end within a few heartbeats instead of living on as orphans
    holding the models' memory, before the dead process is reaped."""
    port = free_port()
    env = {
        **os.environ, "IMGCLS_MODELS": "cifar10_plain20", "IMGCLS_ALLOW_RANDOM_WEIGHTS": "1",
        "IMGCLS_AUTO_DOWNLOAD": "0", "IMGCLS_WEIGHTS_DIR": str(tmp_path), "IMGCLS_COMPILE": "0",
        "PORT": str(port), "IMGCLS_GRPC_PORT": "0",
    }  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        from tests.conftest import wait_until_ready

        wait_until_ready(f"http://127.0.0.1:{port}", 120)
        workers = descendants(proc.pid)
        assert len(workers) >= 2  # the fork server and the worker
        proc.kill()
        # not reaped yet (a zombie, as under a parent slow to wait): its workers notice anyway
        _until(lambda: not running(workers), 15, f"the workers ended: {running(workers)}")
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its group


def test_api_key_and_cors(tmp_path: Path):
    with run_service(
        models="cifar10_plain20", allow_random_weights=True, weights_dir=tmp_path,
        api_key="s3cret\n", cors_origins="https://demo.example",  # read from a file: a newline
    ) as svc:  # fmt: skip
        files = {"file": ("x.png", PNG)}
        assert httpx.post(f"{svc.url}/classify", files=files).status_code == 401
        wrong = httpx.post(
            f"{svc.url}/classify", files=files, headers={"Authorization": "Bearer x"}
        )
        assert wrong.status_code == 401 and wrong.json()["detail"]
        good = httpx.post(
            f"{svc.url}/classify", files=files, headers={"Authorization": "Bearer s3cret"}
        )
        assert good.status_code == 200
        assert httpx.get(f"{svc.url}/healthz").status_code == 200
        assert httpx.get(f"{svc.url}/readyz").status_code == 200
        assert httpx.head(f"{svc.url}/readyz").status_code == 200  # probes that use HEAD
        assert httpx.get(f"{svc.url}/models").status_code == 401
        # refused before the body was asked for, an Expect: 100-continue client is answered
        # and the connection closed (it does not send the body the server would wait for)
        with connect(svc.url) as sock:
            sock.sendall(
                b"POST /classify HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n"
            )
            data, waited, how = read_until_closed(sock, 10)
        assert status_of(data) == 401 and how == "closed" and waited < 3, (how, waited, data[:300])
        pre = httpx.options(
            f"{svc.url}/classify",
            headers={"Origin": "https://demo.example", "Access-Control-Request-Method": "POST"},
        )
        assert pre.headers.get("access-control-allow-origin") == "https://demo.example"
        # /v2 from a page: binary tensor data and compressed requests, and the binary answer's
        # JSON length readable
        pre = httpx.options(
            f"{svc.url}/v2/models/cifar10_plain20/infer",
            headers={"Origin": "https://demo.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers":
                         "authorization, content-type, inference-header-content-length, "
                         "content-encoding"},
        )  # fmt: skip
        assert pre.status_code == 200, pre.text
        r = httpx.post(
            f"{svc.url}/v2/models/cifar10_plain20/infer",
            json={"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                              "data": [base64.b64encode(PNG).decode()]}],
                  "parameters": {"binary_data_output": True}},
            headers={"Authorization": "Bearer s3cret", "Origin": "https://demo.example"},
        )  # fmt: skip
        assert r.status_code == 200 and r.headers["inference-header-content-length"]
        exposed = r.headers["access-control-expose-headers"].lower()
        assert "inference-header-content-length" in exposed
        other = httpx.options(
            f"{svc.url}/classify",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert other.headers.get("access-control-allow-origin") is None


def test_cors_is_off_by_default(client):
    r = client.get("/models", headers={"Origin": "https://demo.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_a_hung_worker_does_not_hold_the_shutdown_past_its_grace(tmp_path: Path):
    """A worker that hangs with a batch (here: stopped) holds the shutdown for
    IMGCLS_SHUTDOWN_GRACE_S, not until the watchdog's IMGCLS_WORKER_TIMEOUT_S: the server's
    wait for in-flight requests, then the service's for the batches at the workers and their
    exit, each within the grace; then the worker is killed, and the log says so and what it
    was doing. The request it held, cancelled by
    uvicorn past the grace, is answered 503 with Retry-After (uvicorn's own answer: a plain-text
    500), with CORS's headers: a page on another origin reads it."""
    grace = 2.0
    origin = "https://demo.example"
    ex = cf.ThreadPoolExecutor(1)
    with (
        log_records("imgcls.pool", logging.WARNING) as records,
        run_service(
            models="cifar10_plain20", allow_random_weights=True, weights_dir=tmp_path,
            shutdown_grace_s=grace, worker_timeout_s=120, request_timeout_s=100,
            cors_origins=origin,
        ) as svc,
    ):  # fmt: skip
        pool = svc.service.pool
        pid = pool.workers[0].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            held = ex.submit(_post, svc.url, "cifar10_plain20", 60, {"Origin": origin})
            _until(
                lambda: any(x.sent_at for w in pool.workers for x in w.inflight.values()),
                30, "a batch reached the worker",
            )  # fmt: skip
            started = time.monotonic()
        except BaseException:
            os.kill(pid, signal.SIGCONT)
            raise
    took = time.monotonic() - started
    ex.shutdown(wait=False)
    assert took < 2 * grace + 10, f"the shutdown took {took:.1f} s"
    _until(lambda: not running([pid]), 10, "the hung worker was killed")
    killed = [r.getMessage() for r in records if "killed" in r.getMessage()]
    assert len(killed) == 1 and killed[0].startswith("worker 0 did not stop within "), killed
    assert killed[0].endswith(" s (running a batch): killed"), killed
    status, _, headers = held.result(timeout=0)
    assert status == 503 and headers.get("retry-after") == "1", (status, headers)
    assert headers["content-type"] == "application/json" and "x-request-id" in headers, headers
    assert headers.get("access-control-allow-origin") == origin, headers
    assert "retry-after" in headers.get("access-control-expose-headers", "").lower(), headers


@pytest.mark.parametrize("timeout_s", [None, 1.0])
def test_total_latency_counts_the_wait_to_parse_the_upload(tmp_path: Path, timeout_s):
    """`latency_ms.total` and the request's deadline run from the upload received in full
    (README): a form parsed on a thread counts its wait for one. With the API process's threads
    held for 1.5 s, an upload's total includes that wait (it started after the parse, and said a
    few ms), and with IMGCLS_REQUEST_TIMEOUT_S=1 the upload is answered 504 (the deadline
    started after the parse: 200)."""
    import asyncio
    import threading

    model = "cifar10_plain20"
    threads = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor
    held = threading.Event()

    def configure(app) -> None:  # a route that keeps every thread of the pool busy for 1.5 s
        async def hold() -> dict[str, bool]:
            jobs = [asyncio.to_thread(time.sleep, 1.5) for _ in range(threads)]
            held.set()
            await asyncio.gather(*jobs)
            return {"held": True}

        app.add_api_route("/hold", hold, methods=["POST"])

    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    png = images.encode(Image.fromarray(noise), "PNG")
    assert len(png) > 8 * 1024  # parsed on a thread, not inline
    deadline = {"request_timeout_s": timeout_s} if timeout_s else {}
    with (
        run_service(models=model, allow_random_weights=True, weights_dir=tmp_path,
                    configure=configure, **deadline) as svc,
        cf.ThreadPoolExecutor(1) as ex,
    ):  # fmt: skip
        holding = ex.submit(httpx.post, f"{svc.url}/hold", timeout=30)
        assert held.wait(10)
        time.sleep(0.2)  # the sleeps have the threads
        r = httpx.post(f"{svc.url}/classify", params={"model": model},
                       files={"file": ("x.png", png)}, timeout=30)  # fmt: skip
        assert holding.result().status_code == 200
    if timeout_s:
        assert r.status_code == 504 and "deadline" in r.json()["detail"], r.text
        return
    assert r.status_code == 200, r.text
    assert r.json()["latency_ms"]["total"] >= 1000, r.json()["latency_ms"]
