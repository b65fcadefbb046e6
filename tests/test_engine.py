"""Worker processes and scheduling: a failing batch fails only its own requests; slots are booked
atomically and first come, first served; a killed or hung worker comes back; restarts leak
nothing; the batcher outlives an error."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from app.catalog import build_catalog
from app.core import gather_fail_fast
from app.engine.batcher import ImageResult, ModelBatcher
from app.engine.pool import (
    LOAD_DEATHS,
    MAX_INFLIGHT_FULL,
    BatchFailedError,
    ModelState,
    WorkerCrashedError,
    WorkerPool,
)
from app.engine.worker import Runner, WorkerConfig
from tests import images
from tests.conftest import ROOT, log_records, ready_pool, run_service
from tests.test_reliability import _metric

PNG = images.encode(images.photo((64, 64)), "PNG")


def _config(*models: str, worker_id: int = 0) -> WorkerConfig:
    catalog = build_catalog()
    plans = [catalog.get(m).load_plan(None) for m in models or ("cifar10_plain20",)]
    return WorkerConfig(worker_id, "cpu", "fp32", False, False, 1, 4, plans)


def _pixels(n: int) -> torch.Tensor:
    return torch.zeros(n, 3, 32, 32, dtype=torch.uint8).share_memory_()


def test_failing_batch_fails_only_itself_and_worker_keeps_serving():
    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            first = await pool.acquire("cifar10_plain20", time.monotonic() + 10)
            assert first is not None
            pid = first.worker.pid
            bad = pool.submit(first, "cifar10_plain20", torch.zeros(2, 3, 7))  # conv fails
            second = await pool.acquire("cifar10_plain20", time.monotonic() + 10, lambda: True)
            assert second is not None
            good = pool.submit(second, "cifar10_plain20", _pixels(3))
            with pytest.raises(BatchFailedError):
                await bad
            assert (await good).probs.shape == (3, 10)
            assert first.worker.alive and first.worker.pid == pid

    asyncio.run(scenario())


def test_model_status_follows_the_backend_that_answered():
    """A compiled model whose graph fails at run time is served eager from then on
    (``worker.Bucketed``): its answers say "eager", and the model's state, which /models
    reports, follows the answers instead of keeping what the load reported. Here the state says
    "inductor" as after such a load, and a real batch from the (eager) worker corrects it."""

    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            assert pool.model_status("cifar10_plain20").backend == "eager"
            pool.workers[0].models["cifar10_plain20"].backend = "inductor"
            slot = await pool.acquire("cifar10_plain20", time.monotonic() + 10)
            assert slot is not None
            result = await pool.submit(slot, "cifar10_plain20", _pixels(2))
            assert result.backend == "eager"
            assert pool.model_status("cifar10_plain20").backend == "eager"

    asyncio.run(scenario())


def test_second_slot_only_for_a_full_batch():
    """A busy worker takes a second batch only when it is full (prefetch); a partial batch
    waits for the worker to be free, so that it can still grow."""

    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            slot = await pool.acquire("cifar10_plain20", time.monotonic() + 10)
            assert slot is not None
            first = pool.submit(slot, "cifar10_plain20", _pixels(1024))  # ~1 s on one thread
            soon = time.monotonic() + 0.05
            assert await pool.acquire("cifar10_plain20", soon) is None
            full = await pool.acquire("cifar10_plain20", soon + 0.05, lambda: True)
            assert full is not None and full.worker is slot.worker
            pool.release(full)
            assert (await first).probs.shape == (1024, 10)
            again = await pool.acquire("cifar10_plain20", time.monotonic() + 1)  # free again
            assert again is not None and again.worker is slot.worker
            pool.release(again)

    asyncio.run(scenario())


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "without-merging"])
def test_clients_answered_while_a_batch_waited_join_it(merge):
    """Two cohorts of closed-loop clients (each sends its next image as soon as it is
    answered), the second arriving while the first's batch runs: a batch that waited for its
    worker waits a little longer for the clients the last batch answered, and the batches
    become full ones of both cohorts. Without it (IMGCLS_BATCH_MERGE_SHARE=0) they stay half
    full."""
    sizes: list[int] = []

    class Sizes:
        def batch_ran(
            self, model: str, images: int, inference_s: float, waits: list[float]
        ) -> None:
            sizes.append(images)

        def image_dropped(self, model: str, reason: str) -> None:
            pass

    async def client(b: ModelBatcher, stop: float) -> None:
        px = torch.zeros(3, 32, 32, dtype=torch.uint8)
        while time.monotonic() < stop:
            await b.submit(px, time.monotonic() + 30)
            await asyncio.sleep(0.002)  # the answer's way back and the next upload

    async def scenario() -> None:
        # one worker thread: a batch of 32 takes tens of milliseconds (about 1 ms an image on
        # one core), against the clients' 2 ms between an answer and their next image
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            b = ModelBatcher(
                "cifar10_plain20", pool, 64, 0.005, 1000, Sizes(), merge_share=1.0 if merge else 0
            )
            b.start()
            try:
                # a first batch: the forward pass's time is known
                await b.submit(torch.zeros(3, 32, 32, dtype=torch.uint8), time.monotonic() + 30)
                stop = time.monotonic() + 3
                first = [asyncio.create_task(client(b, stop)) for _ in range(32)]
                await asyncio.sleep(0.010)  # the second cohort, while the first's batch runs
                second = [asyncio.create_task(client(b, stop)) for _ in range(32)]
                await asyncio.gather(*first, *second)
            finally:
                await b.stop()

    asyncio.run(scenario())
    late = sizes[len(sizes) // 2 :]  # after the first batches, however they fell
    assert len(late) >= 5, sizes
    mean = sum(late) / len(late)
    if merge:
        assert mean >= 48, sizes
    else:
        assert mean <= 34, sizes


async def _one_held_after_512(b: ModelBatcher, deadline_s: float) -> asyncio.Future:
    """A batch of 512 images (~0.5 s on one thread), then one image that waits during it: once
    the 512 are answered (their clients do not come back), that image is held by the merge."""
    px = torch.zeros(3, 32, 32, dtype=torch.uint8)
    first = [b.submit(px, time.monotonic() + 30) for _ in range(512)]
    await asyncio.sleep(0.05)  # that batch runs
    waiting = b.submit(px, time.monotonic() + deadline_s)
    await asyncio.gather(*first)
    await asyncio.sleep(0.05)
    assert not waiting.done()  # held for the 512 answered, who do not come back
    return waiting


def test_a_batcher_stopped_while_it_waits_for_answered_clients_frees_the_worker(monkeypatch):
    """Unloading a model stops its batcher; stopped while it held a free worker for the
    clients its last batch answered, it gives the worker back to the other models."""
    from app.engine import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "MERGE_CAP_S", 60.0)

    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            b = ModelBatcher("cifar10_plain20", pool, 1024, 0.001, 2000, merge_share=1.0)
            b.start()
            waiting = await _one_held_after_512(b, 30)
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await b.stop("unloaded")
            slot = await pool.acquire("cifar10_plain20", time.monotonic() + 2)
            assert slot is not None, "the stopped batcher kept the worker's slot"
            pool.release(slot)
            assert isinstance(waiting.exception(), RuntimeError)

    asyncio.run(scenario())


def test_a_worker_killed_while_a_batch_waits_for_answered_clients_is_not_sent_it(
    monkeypatch, caplog
):
    """Its worker killed while a batch held it for the clients the last batch answered, the
    batch is not sent to the dead worker: the images ask the pool again, and are answered by
    the restarted worker (or fail fast as no worker ready, HTTP 503), never as a crash of a
    batch they were not in. The dead slot's error is consumed, not left to asyncio's
    "exception was never retrieved"."""
    import gc

    from app.engine import batcher as batcher_module
    from app.engine.batcher import NoWorkerError

    monkeypatch.setattr(batcher_module, "MERGE_CAP_S", 60.0)
    sent: list[tuple[int, int]] = []  # (worker pid, images) of every batch sent
    into_dead_slots: list[int] = []  # batches sent into a reservation its worker's death ended
    submit = WorkerPool.submit

    def recording_submit(self, res, name, batch):
        sent.append((res.worker.pid, len(batch)))
        if res.future.done():
            into_dead_slots.append(len(batch))
        return submit(self, res, name, batch)

    monkeypatch.setattr(WorkerPool, "submit", recording_submit)

    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            # a hold of 3 forward passes (~1.5 s): the kill is seen (<= 0.2 s) well within it
            b = ModelBatcher("cifar10_plain20", pool, 1024, 0.001, 2000, merge_share=3.0)
            b.start()
            px = torch.zeros(3, 32, 32, dtype=torch.uint8)
            try:
                waiting = await _one_held_after_512(b, 60)
                old_pid = pool.workers[0].pid
                assert sent == [(old_pid, 512)]
                os.kill(old_pid, signal.SIGKILL)
                try:
                    outcome: object = await asyncio.wait_for(waiting, 120)
                except NoWorkerError as exc:
                    outcome = exc
                assert isinstance(outcome, ImageResult | NoWorkerError), outcome
                assert not into_dead_slots, "a batch was sent into the dead worker's slot"
                assert all(pid != old_pid for pid, _ in sent[1:]), sent
                await pool.wait_status(
                    lambda: len(pool.ready_workers("cifar10_plain20")) == 1,
                    time.monotonic() + 120,
                )
                assert pool.workers[0].pid != old_pid
                assert pool.workers[0].restarts["crash"] == 1
                after = await asyncio.wait_for(b.submit(px, time.monotonic() + 30), 30)
                assert isinstance(after, ImageResult)
                assert sent[-1] == (pool.workers[0].pid, 1)
            finally:
                await b.stop()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(scenario())
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.parametrize("after", ["its-own-batch-on-an-idle-worker", "another-models-batch"])
def test_a_worker_is_held_only_for_clients_its_own_last_batch_answered(monkeypatch, after):
    """The merge waits only where the model's own last batch freed the worker: not for an
    image that finds the worker idle (even with IMGCLS_MAX_BATCH_WAIT_MS=0), and not for one
    that waited while another model's batch ran there, however many the model's own last
    batch answered before."""
    from app.engine import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "MERGE_CAP_S", 60.0)

    async def scenario() -> None:
        cfg = _config("cifar10_plain20", "cifar10_resnet20")
        async with ready_pool([cfg], "cifar10_resnet20") as pool:
            await pool.wait_status(
                lambda: len(pool.ready_workers("cifar10_plain20")) == 1, time.monotonic() + 60
            )
            plain = ModelBatcher("cifar10_plain20", pool, 1024, 0.0, 2000, merge_share=1.0)
            other = ModelBatcher("cifar10_resnet20", pool, 1024, 0.001, 2000)
            plain.start()
            other.start()
            px = torch.zeros(3, 32, 32, dtype=torch.uint8)
            try:
                # plain's own batch of 512 (~0.5 s on one thread): a wait of a whole forward
                # pass, were one made, would show
                await asyncio.gather(*(plain.submit(px, time.monotonic() + 30) for _ in range(512)))
                if after == "another-models-batch":
                    others = [other.submit(px, time.monotonic() + 30) for _ in range(512)]
                    await asyncio.sleep(0.05)  # resnet20's batch runs on the worker
                    one = plain.submit(px, time.monotonic() + 30)
                    await asyncio.gather(*others)
                else:
                    await asyncio.sleep(0.05)
                    one = plain.submit(px, time.monotonic() + 30)
                start = time.monotonic()
                await one
                assert time.monotonic() - start < 0.25, "the worker was held for nobody"
            finally:
                await plain.stop()
                await other.stop()

    asyncio.run(scenario())


def test_a_slot_is_booked_by_exactly_one_waiter_first_come_first_served():
    """Two models on one worker: batchers woken together cannot both book its one partial-batch
    slot, and waiters are served in the order they came, whatever their model."""

    async def scenario() -> None:
        cfg = _config("cifar10_plain20", "cifar10_resnet20")
        async with ready_pool([cfg], "cifar10_resnet20") as pool:
            await pool.wait_status(
                lambda: len(pool.ready_workers("cifar10_plain20")) == 1, time.monotonic() + 60
            )
            soon = time.monotonic() + 0.3
            a, b = await asyncio.gather(
                pool.acquire("cifar10_plain20", soon), pool.acquire("cifar10_resnet20", soon)
            )
            assert (a is None) != (b is None), "one idle slot, booked once"
            held = a or b
            assert held is not None
            # Three waiters queue while the slot is held: A (plain), B (resnet), C (plain).
            order: list[str] = []

            async def wait(tag: str, model: str) -> None:
                res = await pool.acquire(model, time.monotonic() + 30)
                assert res is not None
                order.append(tag)
                pool.submit(res, model, _pixels(1))
                await res.future

            tasks = []
            for tag, model in (("A", "cifar10_plain20"), ("B", "cifar10_resnet20"),
                               ("C", "cifar10_plain20")):  # fmt: skip
                tasks.append(asyncio.create_task(wait(tag, model)))
                await asyncio.sleep(0)  # each registers before the next
            pool.submit(held, "cifar10_plain20" if a else "cifar10_resnet20", _pixels(1))
            await asyncio.gather(*tasks)
            assert order == ["A", "B", "C"]

    asyncio.run(scenario())


def test_two_models_on_one_worker_never_overbook_it():
    """Two batchers under concurrent load on one worker: the worker never holds more batches than
    its slots (checked at every step of the event loop by a sampling task)."""

    async def scenario() -> None:
        cfg = _config("cifar10_plain20", "cifar10_resnet20")
        async with ready_pool([cfg], "cifar10_resnet20") as pool:
            await pool.wait_status(
                lambda: len(pool.ready_workers("cifar10_plain20")) == 1, time.monotonic() + 60
            )
            worker = pool.workers[0]
            batchers = [
                ModelBatcher(m, pool, max_batch_size=4, max_wait_s=0.002, max_queue=1000)
                for m in ("cifar10_plain20", "cifar10_resnet20")
            ]
            for b in batchers:
                b.start()
            peak, samples, stop = 0, 0, False

            async def sample() -> None:
                nonlocal peak, samples
                while not stop:
                    peak = max(peak, len(worker.inflight))
                    samples += 1
                    await asyncio.sleep(0)

            sampler = asyncio.create_task(sample())
            try:
                futures = []
                for i in range(240):
                    b = batchers[i % 2]
                    futures.append(b.submit(torch.zeros(3, 32, 32, dtype=torch.uint8),
                                            time.monotonic() + 60))  # fmt: skip
                    if i % 7 == 0:
                        await asyncio.sleep(0.001)
                results = await asyncio.gather(*futures)
            finally:
                stop = True
                await sampler
                for b in batchers:
                    await b.stop()
            assert all(isinstance(r, ImageResult) for r in results)
            assert samples > 100
            assert 1 <= peak <= MAX_INFLIGHT_FULL, peak

    asyncio.run(scenario())


def test_batcher_survives_an_error_in_its_loop_and_in_a_batch():
    class FailingOnce:
        def __init__(self) -> None:
            self.failed = {"batch": False, "drop": False}

        def batch_ran(
            self, model: str, images: int, inference_s: float, waits: list[float]
        ) -> None:
            if not self.failed["batch"]:
                self.failed["batch"] = True
                raise RuntimeError("observer broke while a batch was answered")

        def image_dropped(self, model: str, reason: str) -> None:
            if not self.failed["drop"]:
                self.failed["drop"] = True
                raise RuntimeError("observer broke in the batching loop")

    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            observer = FailingOnce()
            b = ModelBatcher("cifar10_plain20", pool, 4, 0.001, 100, observer=observer)
            b.start()
            try:
                px = torch.zeros(3, 32, 32, dtype=torch.uint8)
                with pytest.raises(RuntimeError, match="answered"):
                    await b.submit(px, time.monotonic() + 30)
                stale = b.submit(px, time.monotonic() - 1)  # dropped: the loop's observer breaks
                with pytest.raises((RuntimeError, TimeoutError)):
                    await stale
                assert observer.failed == {"batch": True, "drop": True}
                result = await b.submit(px, time.monotonic() + 30)  # batching goes on
                assert result.probs.shape == (10,)
            finally:
                await b.stop()

    asyncio.run(scenario())


def test_gather_fail_fast_cancels_the_others():
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def slow() -> int:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 1

        async def fails() -> int:
            await asyncio.sleep(0.01)
            raise ValueError("first failure")

        t0 = time.monotonic()
        with pytest.raises(ValueError, match="first failure"):
            await gather_fail_fast([slow(), fails(), slow()])
        assert cancelled.is_set() and time.monotonic() - t0 < 5

    asyncio.run(scenario())


def test_cancelled_images_are_dropped_not_computed():
    """What /compare's fail-fast relies on: an image whose waiter was cancelled leaves the queue
    without being computed, and is counted as dropped."""

    class Counts:
        def __init__(self) -> None:
            self.images = 0
            self.dropped: list[str] = []

        def batch_ran(
            self, model: str, images: int, inference_s: float, waits: list[float]
        ) -> None:
            self.images += images

        def image_dropped(self, model: str, reason: str) -> None:
            self.dropped.append(reason)

    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            counts = Counts()
            b = ModelBatcher("cifar10_plain20", pool, 4, 0.2, 100, observer=counts)
            px = torch.zeros(3, 32, 32, dtype=torch.uint8)
            doomed = [b.submit(px, time.monotonic() + 30) for _ in range(3)]
            kept = b.submit(px, time.monotonic() + 30)
            for f in doomed:
                f.cancel()
            b.start()
            try:
                assert (await kept).batch_size == 1
            finally:
                await b.stop()
            assert counts.images == 1 and counts.dropped == ["cancelled"] * 3

    asyncio.run(scenario())


def test_killed_worker_fails_inflight_fast_and_recovers(tmp_path):
    with run_service(
        models="cifar10_plain56", allow_random_weights=True, weights_dir=tmp_path
    ) as svc:
        pool = svc.service.pool
        old_pid = pool.workers[0].pid

        def send(_: int) -> int:
            with httpx.Client(base_url=svc.url, timeout=60) as c:
                r = c.post(
                    "/classify", params={"model": "cifar10_plain56"}, files={"file": ("x.png", PNG)}
                )
                return r.status_code

        with cf.ThreadPoolExecutor(8) as ex:
            futures = [ex.submit(send, i) for i in range(200)]
            _wait(lambda: pool.workers[0].inflight, 30, "no batch in flight")
            os.kill(old_pid, signal.SIGKILL)
            not_ready = _wait_readyz(svc.url, 503, 10)
            codes = [f.result(timeout=60) for f in futures]
        assert "cifar10_plain56" in not_ready["not_ready"][0], not_ready
        assert "worker restarting" in not_ready["not_ready"][0], not_ready
        assert set(codes) <= {200, 503}, codes  # never a 500 or a hang
        assert 503 in codes, "the kill should have caught requests in flight"
        _wait_readyz(svc.url, 200, 120)  # the service comes back by itself
        assert pool.workers[0].pid != old_pid
        assert pool.workers[0].restarts == {"crash": 1, "watchdog": 0}
        # a model loaded later (as pool.load records it) on the restarted worker is loading,
        # not "worker restarting": the restart is over
        pool.workers[0].models["later"] = ModelState()
        try:
            assert pool.model_status("later").reason == "loading and warming up"
        finally:
            del pool.workers[0].models["later"]
        assert _metric(svc.url, "imgcls_worker_restarts", reason="crash") == 1
        r = httpx.post(
            f"{svc.url}/classify", params={"model": "cifar10_plain56"},
            files={"file": ("x.png", PNG)},
        )  # fmt: skip
        assert r.status_code == 200


@pytest.mark.parametrize("busy", [True, False], ids=["hung-with-a-batch", "silent-idle"])
def test_watchdog_restarts_a_hung_worker(tmp_path, busy):
    """A stopped worker (SIGSTOP: what a deadlocked CUDA call looks like from outside) is killed
    and restarted within IMGCLS_WORKER_TIMEOUT_S: with a batch in flight (its age), or idle (its
    heartbeat). Meanwhile its requests get 503 and /readyz says 503; then it serves again."""
    timeout = 3.0
    with run_service(
        models="cifar10_plain20", allow_random_weights=True, weights_dir=tmp_path,
        worker_timeout_s=timeout, request_timeout_s=60,
    ) as svc:  # fmt: skip
        pool = svc.service.pool
        old_pid = pool.workers[0].pid
        with _stopped(old_pid) as t_stop, cf.ThreadPoolExecutor(4) as ex:
            futures = [
                ex.submit(httpx.post, f"{svc.url}/classify",
                          params={"model": "cifar10_plain20"},
                          files={"file": ("x.png", PNG)}, timeout=60)
                for _ in range(4 if busy else 0)
            ]  # fmt: skip
            not_ready = _wait_readyz(svc.url, 503, timeout + 15)
            t_detected = time.monotonic() - t_stop
            answers = [f.result() for f in futures]
        assert t_detected < timeout + 10, t_detected
        assert "cifar10_plain20" in not_ready["not_ready"][0]
        assert all(r.status_code == 503 and r.headers["Retry-After"] for r in answers), answers
        if busy:  # the batch in flight says why; the queued ones found no ready worker
            assert any("stopped answering" in r.json()["detail"] for r in answers)
        _wait_readyz(svc.url, 200, 120)
        assert pool.workers[0].pid != old_pid
        assert pool.workers[0].restarts == {"crash": 0, "watchdog": 1}
        assert _metric(svc.url, "imgcls_worker_restarts", reason="watchdog") == 1
        assert _metric(svc.url, "imgcls_worker_restarts", reason="crash") == 0
        r = httpx.post(f"{svc.url}/classify", params={"model": "cifar10_plain20"},
                       files={"file": ("x.png", PNG)}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text


def test_a_load_asked_of_a_hung_worker_leaves_it_the_hang_limit(tmp_path):
    """A model load asked for while the worker is hung (queued behind what it runs: it never
    begins it) keeps IMGCLS_WORKER_TIMEOUT_S as its limit, not the start-up limit (900 s by
    default: the service stayed stuck that long, every request a 504). Once restarted, the
    worker loads the model too."""
    timeout = 3.0
    with run_service(
        models="cifar10_plain20", allow_random_weights=True, weights_dir=tmp_path,
        worker_timeout_s=timeout, request_timeout_s=60, model_control="explicit",
    ) as svc:  # fmt: skip
        pool = svc.service.pool
        with _stopped(pool.workers[0].pid) as t_stop, cf.ThreadPoolExecutor(1) as ex:
            load = ex.submit(httpx.post, f"{svc.url}/v2/repository/models/cifar10_plain32/load",
                             timeout=120)  # fmt: skip
            _wait(lambda: pool.workers[0].restarts["watchdog"] == 1, timeout + 15,
                  "the hung worker killed")  # fmt: skip
            t_detected = time.monotonic() - t_stop
            loaded = load.result()
        assert t_detected < timeout + 10, t_detected
        assert loaded.status_code == 200, loaded.text
        for model in ("cifar10_plain20", "cifar10_plain32"):
            r = httpx.post(f"{svc.url}/classify", params={"model": model},
                           files={"file": ("x.png", PNG)}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text


def _parent(pid: int | None) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _maps(pid: int) -> str:
    """What the process has mapped: its libraries among them."""
    return Path(f"/proc/{pid}/maps").read_text()


def test_cpu_workers_fork_from_a_server_that_imported_torch_and_ignores_sigterm():
    """CPU workers are forked from multiprocessing's fork server, a child of the API process that
    imported torch and the engine once (a worker does not import them again at each restart).
    The server ignores SIGTERM, as the workers do: a SIGTERM to the process group must not end
    it, since the pool learns its workers' exit through it (it would count them all dead while
    they serve). CUDA workers are still spawned."""
    from app.engine import pool as pool_module
    from app.engine.worker import HEARTBEAT_S

    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            w = pool.workers[0]
            server = _parent(w.pid)
            assert server != os.getpid() and _parent(server) == os.getpid()
            assert "libtorch_cpu" in _maps(server)
            os.kill(server, signal.SIGTERM)
            await asyncio.sleep(3 * HEARTBEAT_S)  # a dead server: the worker would end itself
            assert _parent(w.pid) == server
            slot = await pool.acquire("cifar10_plain20", time.monotonic() + 10)
            assert slot is not None and slot.worker is w
            assert (await pool.submit(slot, "cifar10_plain20", _pixels(2))).probs.shape == (2, 10)
            assert w.alive and sum(w.restarts.values()) == 0

    asyncio.run(scenario())
    cuda = WorkerConfig(0, "cuda:0", "fp16", True, False, 1, 4, [])
    assert pool_module._context([cuda]).get_start_method() == "spawn"
    assert pool_module._context([_config()]).get_start_method() == "forkserver"


_SLOW_SERVER = """
import asyncio, time
from app.engine import pool as pool_module
from app.engine.worker import WorkerConfig

real = pool_module._context


def slow(configs):  # a fork server whose preload takes 4 s more (torch takes ~4 s of a core)
    ctx = real(configs)
    ctx.set_forkserver_preload(["slow_preload", "app.engine.forkserver"])
    return ctx


async def main():
    lag = 0.0

    async def tick():
        nonlocal lag
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.02)
            lag = max(lag, time.monotonic() - t - 0.02)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.1)  # ticking
    pool = pool_module.WorkerPool([WorkerConfig(0, "cpu", "fp32", False, False, 1, 4, [])])
    t = time.monotonic()
    await pool.start()
    took = time.monotonic() - t
    await asyncio.sleep(0.1)  # a tick that began before a stall ends after it
    ticker.cancel()
    await pool.close()
    print(pool._ctx.get_start_method(), took, lag)


if __name__ == "__main__":
    pool_module._context = slow
    asyncio.run(main())
"""


def test_the_event_loop_runs_while_the_fork_server_imports(tmp_path):
    """A worker's start waits for the fork server's answer, which comes once the server has
    imported torch: the pool waits for that on a thread, so the service answers (/healthz,
    /readyz) while its first workers start. Measured in a fresh process, whose fork server has
    yet to start, with a preload made 4 s slower: the event loop never stalls for it."""
    (tmp_path / "slow_preload.py").write_text("import time\n\ntime.sleep(4)\n")
    (tmp_path / "start.py").write_text(_SLOW_SERVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    r = subprocess.run(
        [sys.executable, str(tmp_path / "start.py")], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    method, took, lag = r.stdout.split()[-3:]
    assert method == "forkserver" and float(took) >= 4.0, r.stdout  # it did wait for the server
    assert float(lag) < 1.0, f"the event loop stalled {float(lag):.2f} s"


def test_a_foreign_app_in_the_working_directory_keeps_workers_spawned(tmp_path, monkeypatch):
    """The fork server starts with the working directory first on its path (Python < 3.12.8
    ignores the API process's path there): a user's own ``app.py`` would be imported in place of
    this package and every forked worker would fail. Workers are spawned instead, and serve."""
    from app.engine import pool as pool_module

    monkeypatch.chdir(tmp_path)
    assert pool_module._context([_config()]).get_start_method() == "forkserver"  # nothing here
    (tmp_path / "app.py").write_text("raise SystemExit('the wrong app')\n")
    assert pool_module._context([_config()]).get_start_method() == "spawn"

    async def scenario() -> None:
        async with ready_pool([_config()], "cifar10_plain20") as pool:
            slot = await pool.acquire("cifar10_plain20", time.monotonic() + 10)
            assert slot is not None
            assert (await pool.submit(slot, "cifar10_plain20", _pixels(1))).probs.shape == (1, 10)

    asyncio.run(scenario())
    monkeypatch.chdir(Path(pool_module.__file__).parents[2])  # this checkout: its own app
    assert pool_module._context([_config()]).get_start_method() == "forkserver"


def test_twenty_restarts_under_load_leak_nothing():
    """Old queues are closed and their feeder threads end: after 20 forced restarts under load
    the API process holds no more file descriptors, threads or shared-memory segments than after
    the first."""

    def descriptors() -> set[tuple[str, str]]:
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # closed while listing
                found.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        return found

    # shared-memory descriptors this process held before the pool (earlier tests' tensors):
    # not this pool's batches
    earlier = {d for d in descriptors() if d[1].startswith("/dev/shm/torch_")}

    def resources() -> tuple[int, int, int, int]:
        held = descriptors()
        # A batch's pixels cross in shared memory and hold a /dev/shm descriptor until the
        # worker has them: a few at any moment (the batches on their way), counted apart (as
        # the soak does); those of batches a dead worker never fetched must not pile up.
        batches = sum(t.startswith("/dev/shm/torch_") and (fd, t) not in earlier for fd, t in held)
        shm = len([f for f in os.listdir("/dev/shm") if f.startswith("torch_")])
        return len(held) - batches, threading.active_count(), shm, batches

    async def scenario() -> tuple[tuple[int, ...], tuple[int, ...]]:
        pool = WorkerPool([_config()], backoff_s=0.0)
        await pool.start()
        b = ModelBatcher("cifar10_plain20", pool, 4, 0.001, 10_000)
        b.start()
        stop = False
        answered = 0

        async def load() -> None:
            nonlocal answered
            while not stop:
                fut = b.submit(torch.zeros(3, 32, 32, dtype=torch.uint8), time.monotonic() + 30)
                try:
                    await fut
                    answered += 1
                except (WorkerCrashedError, RuntimeError, TimeoutError):
                    await asyncio.sleep(0.01)  # the worker is restarting: try again shortly

        try:
            await pool.wait_status(lambda: bool(pool.ready_workers("cifar10_plain20")),
                                   time.monotonic() + 60)  # fmt: skip
            loaders = [asyncio.create_task(load()) for _ in range(3)]
            baseline = None
            for i in range(21):
                w = pool.workers[0]
                old = w.pid
                assert old is not None
                os.kill(old, signal.SIGKILL)
                ok = await pool.wait_status(
                    lambda w=w, old=old: (
                        w.pid != old and bool(pool.ready_workers("cifar10_plain20"))
                    ),
                    time.monotonic() + 60,
                )
                assert ok, f"restart {i + 1} did not come back"
                before = answered  # some traffic through the new worker before the next kill
                await _until(lambda before=before: answered >= before + 3, 30)
                if i == 0:
                    baseline = resources()
            after = resources()
            stop = True
            await asyncio.gather(*loaders)
            assert pool.workers[0].restarts["crash"] == 21
            assert baseline is not None
            return baseline, after
        finally:
            stop = True
            await b.stop()
            await pool.close()

    baseline, after = asyncio.run(scenario())
    print(f"after 1 restart: fds, threads, shm, batch fds = {baseline}; after 21: {after}")
    assert after[0] <= baseline[0] + 2, (baseline, after)  # fds (a batch may be on its way)
    assert after[1] <= baseline[1], (baseline, after)  # threads
    assert after[2] <= baseline[2] + 8, (baseline, after)  # transient batch segments
    assert after[3] <= 2 * MAX_INFLIGHT_FULL, (baseline, after)  # batches on their way


async def _until(cond, within: float) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@contextlib.contextmanager
def _stopped(pid: int | None) -> Iterator[float]:
    """A worker stopped (SIGSTOP: hung, as a deadlocked CUDA call looks from outside) from the
    time yielded; let go on exit, if the watchdog has not killed it by then."""
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _wait(cond, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.005)


def _wait_readyz(url: str, status: int, within: float) -> dict:
    deadline = time.monotonic() + within
    while True:
        r = httpx.get(f"{url}/readyz", timeout=10)
        if r.status_code == status:
            return r.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz stayed {r.status_code}: {r.text}")
        time.sleep(0.02)


def test_unwritable_weights_folder_fails_loudly_within_seconds():
    """A read-only volume: the model is `failed` with the OSError and the path, /readyz says so,
    and the log has it, within seconds (not `loading` for good)."""
    with run_service(
        wait_ready=False, models="cifar10_resnet20", weights_dir=Path("/proc/imgcls-weights"),
        auto_download=True,
    ) as svc:  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            entry = httpx.get(f"{svc.url}/models/cifar10_resnet20").json()
            if entry["status"] != "loading" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert entry["status"] == "failed", entry
        assert "/proc/imgcls-weights" in entry["reason"], entry
        ready = httpx.get(f"{svc.url}/readyz")
        assert ready.status_code == 503 and "failed" in ready.json()["not_ready"][0]
        r = httpx.post(f"{svc.url}/classify", files={"file": ("x.png", PNG)})
        detail = r.json()["detail"]
        assert r.status_code == 503 and "failed" in detail and "/models/cifar10_resnet20" in detail
        assert "/proc/imgcls-weights" not in detail  # the operator's detail stays in /models


def test_server_fault_answers_in_client_terms_with_request_id(tmp_path):
    """A model that outputs NaN (a broken checkpoint): the client gets a 500 that says what
    happened in its terms and carries the request id; the detail goes to the log."""
    from torchvision.models import get_model_builder

    torch.manual_seed(0)
    model = get_model_builder("resnet18")(weights=None, num_classes=3)
    state = model.state_dict()
    state["fc.bias"][:] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    (tmp_path / "nan.txt").write_text("a\nb\nc\n")
    (tmp_path / "m.toml").write_text(
        '[models.broken]\narch = "resnet18"\nweights = "nan.pt"\nlabels = "nan.txt"\n'
    )
    with log_records("imgcls") as records:
        _classify_broken(tmp_path)
    logged = [r for r in records if r.exc_info and "req-nan-1" in r.getMessage()]
    assert logged and "non-finite" in str(logged[0].exc_info[1]), [r.getMessage() for r in records]


def _classify_broken(tmp_path: Path) -> None:
    with run_service(models="broken", weights_dir=tmp_path, model_config_file=tmp_path / "m.toml",
                     log_level="info") as svc:  # fmt: skip
        r = httpx.post(f"{svc.url}/classify", files={"file": ("x.png", PNG)},
                       headers={"X-Request-ID": "req-nan-1"}, timeout=60)  # fmt: skip
        assert r.status_code == 500
        detail = r.json()["detail"]
        assert "req-nan-1" in detail and "inference failed" in detail
        assert "non-finite" not in detail and "Error" not in detail and "Traceback" not in detail
        assert svc.service.pool.workers[0].alive  # a bad output is no reason to restart


def test_a_ready_model_waits_for_its_worker_to_finish_loading_another(tmp_path):
    """One worker, a model ready on it, and a second model loaded at run time: while the worker
    builds the second (it runs nothing beside), requests for the first wait for it and are
    answered, not refused with 503 as if no worker had the model."""
    with run_service(
        models="cifar10_resnet20", allow_random_weights=True, weights_dir=tmp_path,
        model_control="explicit",
    ) as svc:  # fmt: skip
        pool = svc.service.pool
        with cf.ThreadPoolExecutor(1) as ex:
            load = ex.submit(
                httpx.post, f"{svc.url}/v2/repository/models/resnet18/load", timeout=300
            )
            _wait(lambda: pool.workers[0].loading, 60, "the worker never started loading")
            assert svc.service.status("cifar10_resnet20").status == "ready"
            r = httpx.post(
                f"{svc.url}/classify", params={"model": "cifar10_resnet20"},
                files={"file": ("x.png", PNG)}, timeout=300,
            )  # fmt: skip
            loaded = load.result()
        assert r.status_code == 200, r.text
        assert loaded.status_code == 200, loaded.text


def test_a_model_that_kills_its_worker_while_loading_is_left_out_of_its_restarts(tmp_path):
    """A worker killed each time it loads a model (as the kernel's OOM killer kills a worker
    whose new model does not fit) restarts LOAD_DEATHS times, then without that model: the
    load answers 503 saying why, the model served beside it answers again, and the failed one
    unloads at once. Before, every restart loaded it again (the other model down with it) and
    the load held the model's lock, unload included, for up to IMGCLS_WORKER_STARTUP_TIMEOUT_S."""
    with run_service(
        models="cifar10_resnet20", allow_random_weights=True, weights_dir=tmp_path,
        model_control="explicit",
    ) as svc:  # fmt: skip
        w = svc.service.pool.workers[0]
        url = f"{svc.url}/v2/repository/models/resnet18"
        with cf.ThreadPoolExecutor(1) as ex:
            load = ex.submit(httpx.post, f"{url}/load", timeout=300)
            killed: set[int] = set()
            for _ in range(LOAD_DEATHS):
                _wait(lambda: w.alive and w.building == "resnet18" and w.pid not in killed, 120,
                      "the worker never loaded resnet18")  # fmt: skip
                killed.add(w.pid)
                os.kill(w.pid, signal.SIGKILL)
            r = load.result()
        assert r.status_code == 503, r.text
        assert f"died {LOAD_DEATHS} times in a row while loading it" in r.json()["error"]
        _wait(lambda: svc.service.status("cifar10_resnet20").status == "ready", 120,
              "the other model never came back")  # fmt: skip
        assert w.pid not in killed and [p.name for p in w.plans] == ["cifar10_resnet20"]
        assert svc.service.status("resnet18").status == "failed"
        r = httpx.post(f"{svc.url}/classify", params={"model": "cifar10_resnet20"},
                       files={"file": ("x.png", PNG)}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/unload", timeout=60)
        assert r.status_code == 200, r.text
        assert svc.service.status("resnet18").status == "not-loaded"
        assert sum(w.restarts.values()) == LOAD_DEATHS


def test_a_batch_that_cannot_be_handed_over_gives_its_slot_back(monkeypatch):
    """A batch that fails after its worker slot was booked and before it was sent (shared
    memory full) fails with 503 and gives the slot back: the next batches run. Before, the
    booked slot was never freed and every later batch waited for it until its deadline."""
    from app.engine import batcher as batcher_module
    from app.engine.batcher import NoWorkerError

    spec = build_catalog().get("cifar10_plain20")
    cfg = WorkerConfig(0, "cpu", "fp32", False, False, 1, 4, [spec.load_plan(None)])
    real = batcher_module.stack_shared
    failures = [OSError(28, "No space left on device")]  # as /dev/shm full raises it

    def stack(tensors):
        if failures:
            raise failures.pop()
        return real(tensors)

    monkeypatch.setattr(batcher_module, "stack_shared", stack)
    pixels = torch.zeros(3, 32, 32, dtype=torch.uint8)

    async def scenario() -> None:
        async with ready_pool([cfg], spec.name) as pool:
            b = ModelBatcher(spec.name, pool, max_batch_size=4, max_wait_s=0.01, max_queue=64)
            b.start()
            try:
                first = await asyncio.gather(
                    b.submit(pixels, time.monotonic() + 30), return_exceptions=True
                )
                assert isinstance(first[0], NoWorkerError), first
                assert "retry shortly" in str(first[0])
                for _ in range(3):  # more batches than the worker's slots: each freed again
                    done = await asyncio.wait_for(
                        asyncio.gather(
                            *[b.submit(pixels, time.monotonic() + 30) for _ in range(4)]
                        ),
                        30,
                    )
                    assert all(isinstance(r, ImageResult) for r in done)
                assert not any(w.inflight for w in pool.workers)
                assert b.stats.fail.count == 1 and b.stats.success.count == 12
            finally:
                await b.stop()

    asyncio.run(scenario())


def test_a_process_that_exits_without_closing_its_pool_does_not_hang(tmp_path):
    """Workers ignore SIGTERM (the API process stops them). A process that exits without
    closing its pool (a second Ctrl-C skips the lifespan shutdown) must still exit: at exit its
    workers are killed, before multiprocessing's exit hook would SIGTERM them and wait
    forever."""
    import subprocess
    import sys

    from tests.conftest import ROOT, running

    code = (
        "import asyncio, time\n"
        "from app.catalog import build_catalog\n"
        "from app.engine.pool import WorkerPool\n"
        "from app.engine.worker import WorkerConfig\n"
        "spec = build_catalog().get('cifar10_plain20')\n"
        "cfg = WorkerConfig(0, 'cpu', 'fp32', False, False, 1, 1, [spec.load_plan(None)])\n"
        "async def main():\n"
        "    pool = WorkerPool([cfg])\n"
        "    await pool.start()\n"
        "    while not pool.workers[0].started:\n"
        "        await asyncio.sleep(0.05)\n"
        "    print(pool.workers[0].pid, flush=True)\n"
        "asyncio.run(main())\n"  # returns with the pool open
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "IMGCLS_WEIGHTS_DIR": str(tmp_path)},
    )  # fmt: skip
    try:
        pid = int(proc.stdout.readline())
        assert proc.wait(30) == 0
        _wait(lambda: not running([pid]), 10, "the worker ended")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_random_weights_are_one_network_on_every_worker_and_in_explanations():
    """Without a checkpoint (IMGCLS_ALLOW_RANDOM_WEIGHTS) the weights are drawn from a seed of
    the model's name: two workers answer alike, and the fp32 copy explanations run on (built on
    first use) is the network that answered, not another random draw."""
    from app.preprocess import normalize

    spec = build_catalog().get("cifar10_plain20")
    plan = spec.load_plan(None)
    cfg = WorkerConfig(0, "cpu", "fp32", False, False, 1, 4, [plan])
    first, second = Runner(cfg), Runner(cfg)
    torch.manual_seed(1)
    first.load(plan)
    torch.manual_seed(2)  # whatever state the generator is in
    second.load(plan)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    answer = first.forward(spec.name, x)
    assert torch.equal(answer, second.forward(spec.name, x))
    explained, _layer = first.explainer(spec.name)
    pre = spec.transform
    with torch.no_grad():
        probs = explained(normalize(x, pre.mean, pre.std)).softmax(1)
    torch.testing.assert_close(answer, probs, atol=1e-5, rtol=0)
