"""Worker processes: a failing batch fails only its own requests; a killed worker comes back."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import time

import httpx
import pytest
import torch

from app.catalog import build_catalog
from app.engine.pool import BatchFailedError
from app.engine.worker import WorkerConfig
from tests import images
from tests.conftest import needs_shared, ready_pool, run_service


def _config(worker_id: int = 0) -> WorkerConfig:
    spec = build_catalog().get("cifar10_plain20")
    plan = spec.load_plan(None)
    return WorkerConfig(worker_id, "cpu", "fp32", False, False, 1, 4, [plan])


def test_failing_batch_fails_only_itself_and_worker_keeps_serving():
    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            w = await pool.acquire("cifar10_plain20", time.monotonic() + 10)
            assert w is not None
            pid = w.pid
            bad = pool.submit(w, "cifar10_plain20", torch.zeros(2, 3, 7))  # wrong rank: conv fails
            good = pool.submit(w, "cifar10_plain20", torch.zeros(3, 3, 32, 32).share_memory_())
            with pytest.raises(BatchFailedError):
                await bad
            result = await good
            assert result.probs.shape == (3, 10)
            assert w.alive and w.pid == pid

    asyncio.run(scenario())


def test_second_slot_only_for_a_full_batch():
    """A busy worker takes a second batch only when it is full (prefetch); a partial batch
    waits for the worker to be free, so that it can still grow."""

    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            w = await pool.acquire("cifar10_plain20", time.monotonic() + 10)
            assert w is not None
            big = torch.zeros(1024, 3, 32, 32, dtype=torch.uint8).share_memory_()
            first = pool.submit(w, "cifar10_plain20", big)  # ~1 s on one thread
            soon = time.monotonic() + 0.05
            assert await pool.acquire("cifar10_plain20", soon) is None
            assert await pool.acquire("cifar10_plain20", soon + 0.05, lambda: True) is w
            assert (await first).probs.shape == (1024, 10)
            assert await pool.acquire("cifar10_plain20", time.monotonic() + 1) is w  # free again

    asyncio.run(scenario())


@needs_shared
def test_killed_worker_fails_inflight_fast_and_recovers(tmp_path):
    png = images.encode(images.photo((64, 64)), "PNG")
    with run_service(
        models="cifar10_plain56", allow_random_weights=True, weights_dir=tmp_path
    ) as svc:
        pool = svc.service.pool
        old_pid = pool.workers[0].pid

        def send(_: int) -> int:
            with httpx.Client(base_url=svc.url, timeout=60) as c:
                r = c.post(
                    "/classify", params={"model": "cifar10_plain56"}, files={"file": ("x.png", png)}
                )
                return r.status_code

        with cf.ThreadPoolExecutor(8) as ex:
            futures = [ex.submit(send, i) for i in range(200)]
            deadline = time.monotonic() + 60
            while not pool.workers[0].inflight and time.monotonic() < deadline:  # work is there
                time.sleep(0.005)
            os.kill(old_pid, signal.SIGKILL)
            t_kill = time.monotonic()
            not_ready = None
            while time.monotonic() - t_kill < 5:  # /readyz says so while the worker restarts
                r = httpx.get(f"{svc.url}/readyz")
                if r.status_code == 503:
                    not_ready = r.json()["not_ready"]
                    break
                time.sleep(0.02)
            codes = [f.result(timeout=60) for f in futures]
        assert not_ready and "cifar10_plain56" in not_ready[0], not_ready
        assert set(codes) <= {200, 503}, codes  # never a 500 or a hang
        print("status codes:", {c: codes.count(c) for c in set(codes)})
        assert 503 in codes, "the kill should have caught requests in flight"
        # readiness reflects the restart, then the service comes back by itself
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if httpx.get(f"{svc.url}/readyz").status_code == 200:
                break
            time.sleep(0.1)
        assert httpx.get(f"{svc.url}/readyz").status_code == 200
        assert pool.workers[0].pid != old_pid and pool.workers[0].restarts == 1
        r = httpx.post(
            f"{svc.url}/classify",
            params={"model": "cifar10_plain56"},
            files={"file": ("x.png", png)},
        )
        assert r.status_code == 200
