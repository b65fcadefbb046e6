"""The pool of device worker processes and the bookkeeping of their models.

Each worker is a process (spawned, never forked, so CUDA and thread pools start clean) with an
inbox and an outbox. A reader thread per worker turns its messages into resolved futures on the
event loop, and notices when the process dies: its in-flight batches fail at once with
WorkerCrashedError and the worker is started again with the same models.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from app.engine.worker import WorkerConfig, worker_main

log = logging.getLogger("imgcls.pool")

# One batch in flight per worker: while it runs, new images gather into the next, larger batch.
# A second, full batch may wait at the worker (prefetch), so that it starts the moment the first
# ends instead of after a round trip through the API process (~7 ms per batch on 2 busy cores).
MAX_INFLIGHT_PER_WORKER = 1
MAX_INFLIGHT_FULL = 2


class WorkerCrashedError(RuntimeError):
    """The worker process died while this batch was in flight."""


class NoReadyWorkerError(RuntimeError):
    """No worker has the model ready right now (HTTP 503)."""


class BatchFailedError(RuntimeError):
    """The model raised an error on this batch; the worker is still serving."""


@dataclass
class BatchResult:
    probs: np.ndarray  # (batch, classes) float32
    start: float  # time.monotonic() when the forward pass began
    inference_ms: float
    device: str
    precision: str
    backend: str  # eager | inductor
    # Uploads decoded in the worker: (rows, errors, decode_ms, preprocess_ms), see decoding.py
    items: tuple[list[int], dict[int, tuple[int, str]], list[float], list[float]] | None = None


@dataclass
class ModelState:
    status: str = "loading"  # loading | ready | failed
    reason: str | None = None
    precision: str | None = None
    backend: str | None = None


@dataclass(frozen=True)
class ModelStatus:
    """A model's state aggregated over the workers (and, in the service, its weights)."""

    status: str  # ready | loading | missing-weights | failed | not-loaded
    reason: str | None = None
    devices: tuple[str, ...] = ()
    precision: str | None = None
    backend: str | None = None


@dataclass
class WorkerHandle:
    worker_id: int
    cfg: WorkerConfig
    process: Any = None
    inbox: Any = None
    outbox: Any = None
    pid: int | None = None
    inflight: dict[int, asyncio.Future[BatchResult]] = field(default_factory=dict)
    models: dict[str, ModelState] = field(default_factory=dict)
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)  # monotonic times of recent crashes
    alive: bool = False
    stopping: bool = False
    device_memory: int = 0  # CUDA bytes allocated, as last reported

    @property
    def device(self) -> str:
        return self.cfg.device


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def resolve_devices(device: str) -> list[str]:
    if device == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if device == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise RuntimeError("IMGCLS_DEVICE=cuda but no CUDA device is visible")
        return [f"cuda:{i}" for i in range(n)]
    return [device]


class WorkerPool:
    def __init__(self, configs: list[WorkerConfig]) -> None:
        self._ctx = mp.get_context("spawn")
        self.workers = [WorkerHandle(c.worker_id, c) for c in configs]
        self._batch_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Resolved whenever a slot or a status changes: plain futures, not an Event under
        # wait_for, so a waiting batcher wakes one loop iteration after a result arrives.
        self._waiters: set[asyncio.Future[None]] = set()
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for w in self.workers:
            self._spawn(w)

    def _spawn(self, w: WorkerHandle) -> None:
        w.inbox = self._ctx.Queue()
        w.outbox = self._ctx.Queue()
        w.models = {p.name: ModelState() for p in w.cfg.plans}
        w.process = self._ctx.Process(
            target=worker_main,
            args=(w.cfg, w.inbox, w.outbox),
            name=f"imgcls-worker-{w.worker_id}",
            daemon=True,
        )
        w.process.start()
        w.alive = True
        threading.Thread(
            target=self._read, args=(w, w.process, w.outbox), daemon=True, name="pool-reader"
        ).start()

    async def close(self, grace_s: float = 10.0) -> None:
        self._closed = True
        for w in self.workers:
            w.stopping = True
            if w.process is not None and w.process.is_alive():
                w.inbox.put(None)
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            if w.process is None:
                continue
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.to_thread(w.process.join, remaining)
            if w.process.is_alive():
                w.process.kill()
                await asyncio.to_thread(w.process.join, 5)
            self._fail_inflight(w, WorkerCrashedError("the service is shutting down"))

    # ---- reader thread ---------------------------------------------------------------------
    def _read(self, w: WorkerHandle, process: Any, outbox: Any) -> None:
        while True:
            try:
                msg = outbox.get(timeout=0.2)
            except queue.Empty:
                if not process.is_alive():
                    break
                continue
            except (EOFError, OSError):
                break
            self._call(self._on_message, w, msg)
        self._call(self._on_exit, w, process)

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(fn, *args)

    def _on_message(self, w: WorkerHandle, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "result":
            _, batch_id, probs, start, ms, (precision, backend, memory), items = msg
            w.device_memory = memory
            fut = w.inflight.pop(batch_id, None)
            # The slot first: the batcher sends the next batch before this one's answers are built.
            self._notify_slot()
            if fut is not None and not fut.done():
                fut.set_result(BatchResult(probs, start, ms, w.device, precision, backend, items))
        elif kind == "error":
            _, batch_id, detail = msg
            fut = w.inflight.pop(batch_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(BatchFailedError(detail))
            self._notify_slot()
        elif kind == "status":
            _, name, status, reason, info = msg
            st = w.models.setdefault(name, ModelState())
            st.status, st.reason = status, reason
            if info:
                st.precision, st.backend = info.get("precision"), info.get("backend")
            if status == "failed":
                log.error("worker %s failed to load %s: %s", w.worker_id, name, reason)
            self._notify_slot()
        elif kind == "started":
            w.pid = msg[1]

    def _on_exit(self, w: WorkerHandle, process: Any) -> None:
        if process is not w.process:
            return
        w.alive = False
        code = process.exitcode
        self._fail_inflight(
            w, WorkerCrashedError(f"worker {w.worker_id} on {w.device} died (exit code {code})")
        )
        if w.stopping or self._closed:
            return
        w.restarts += 1
        # Restart at once after a single crash; back off when it keeps dying (a model that
        # crashes while loading must not turn into a fork loop).
        now = time.monotonic()
        w.deaths = [t for t in w.deaths if now - t < 60.0] + [now]
        delay = 0.0 if len(w.deaths) <= 1 else min(30.0, 2.0 ** (len(w.deaths) - 2))
        log.error(
            "worker %s on %s died (exit code %s); restarting in %.0fs",
            w.worker_id, w.device, code, delay,
        )  # fmt: skip
        assert self._loop is not None
        self._loop.call_later(delay, self._restart, w)
        self._notify_slot()

    def _restart(self, w: WorkerHandle) -> None:
        if not (w.stopping or self._closed):
            self._spawn(w)

    def _fail_inflight(self, w: WorkerHandle, exc: Exception) -> None:
        pending, w.inflight = w.inflight, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def poke(self) -> None:
        """Wake waiting batchers to look again (a batch became full)."""
        self._notify_slot()

    def _notify_slot(self) -> None:
        for waiter in self._waiters:
            _resolve(waiter)

    # ---- scheduling ------------------------------------------------------------------------
    def ready_workers(self, name: str) -> list[WorkerHandle]:
        return [
            w
            for w in self.workers
            if w.alive and (st := w.models.get(name)) is not None and st.status == "ready"
        ]

    async def acquire(
        self, name: str, deadline: float, full: Callable[[], bool] = lambda: False
    ) -> WorkerHandle | None:
        """The least-busy worker holding ``name`` with a free slot: an idle one, or, while
        ``full()`` says the batch is full, one with a single batch in flight.

        None when every such worker stayed busy until ``deadline``; NoReadyWorkerError at once
        when no worker has the model ready (crashed, restarting), so requests fail fast.
        """
        assert self._loop is not None
        while True:
            ready = self.ready_workers(name)
            if not ready:
                raise NoReadyWorkerError(f"no worker has {name} ready (restarting?)")
            limit = MAX_INFLIGHT_FULL if full() else MAX_INFLIGHT_PER_WORKER
            candidates = [w for w in ready if len(w.inflight) < limit]
            if candidates:
                return min(candidates, key=lambda w: len(w.inflight))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # No await between the check above and registering: no change can be missed.
            waiter: asyncio.Future[None] = self._loop.create_future()
            timer = self._loop.call_later(remaining, _resolve, waiter)
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiters.discard(waiter)

    def submit(
        self, w: WorkerHandle, name: str, batch: torch.Tensor | list[Any]
    ) -> asyncio.Future[BatchResult]:
        """Send a batch to a worker: uint8 pixels in shared memory, or uploads to decode there;
        the future resolves with its result."""
        assert self._loop is not None
        batch_id = next(self._batch_ids)
        fut: asyncio.Future[BatchResult] = self._loop.create_future()
        w.inflight[batch_id] = fut
        try:
            w.inbox.put((batch_id, name, batch))
        except Exception as exc:
            w.inflight.pop(batch_id, None)
            fut.set_exception(WorkerCrashedError(f"cannot reach worker {w.worker_id}: {exc}"))
        return fut

    # ---- status ----------------------------------------------------------------------------
    def model_status(self, name: str) -> ModelStatus:
        """The model's state aggregated over workers: ready where any worker is ready."""
        states = [(w, w.models[name]) for w in self.workers if name in w.models]
        ready = [(w, s) for w, s in states if s.status == "ready" and w.alive]
        if ready:
            devices = tuple(sorted({w.device for w, _ in ready}))
            first = ready[0][1]
            return ModelStatus("ready", None, devices, first.precision, first.backend)
        failed = [s for _, s in states if s.status == "failed"]
        if states and len(failed) == len(states):
            return ModelStatus("failed", failed[0].reason)
        restarting = any(not w.alive or w.restarts for w, _ in states)
        return ModelStatus(
            "loading", "worker restarting" if restarting else "loading and warming up"
        )

    def fully_ready(self, name: str) -> bool:
        return all(
            w.alive and w.models.get(name, ModelState()).status == "ready" for w in self.workers
        )
