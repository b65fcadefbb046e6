"""The pool of device worker processes and the bookkeeping of their models.

Each worker is a process, never forked from the API process (so CUDA and thread pools start
clean), with an inbox and an outbox: CPU workers fork from multiprocessing's fork server, which
imported torch once (``_context``), CUDA workers are spawned. A reader thread per worker turns
its messages into resolved futures on the event loop, and notices when the process dies: its
in-flight batches fail at once with WorkerCrashedError and the worker is started again with the
same models.

A watchdog restarts a worker that hangs: one whose oldest batch has been in flight longer than the
worker timeout (longer while it is loading or compiling a model), or whose heartbeat thread has
fallen silent (a stopped process, a process stuck outside Python). It is killed and treated like a
crashed one, and counted apart.

Scheduling is first come, first served across models: a batcher that wants a worker joins one FIFO
queue of waiters, and a free slot is reserved for the first waiter that can use it in the same
step that finds it, so no two batchers can book one slot.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing import resource_sharer
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from app.engine.plan import LoadPlan
from app.engine.worker import WorkerConfig, worker_main

log = logging.getLogger("imgcls.pool")

# One batch in flight per worker: while it runs, new images gather into the next, larger batch.
# A second, full batch may wait at the worker (prefetch), so that it starts the moment the first
# ends instead of after a round trip through the API process (~7 ms per batch on 2 busy cores).
MAX_INFLIGHT_PER_WORKER = 1
MAX_INFLIGHT_FULL = 2

# A worker that dies this many times in a row while loading one model (killed for memory, a
# crash in a kernel) restarts without it: the model fails on that worker, and the others it
# serves come back instead of going down with every restart.
LOAD_DEATHS = 3

WATCHDOG_PERIOD_S = 0.5


class WorkerCrashedError(RuntimeError):
    """The worker process died, or was restarted by the watchdog, while this batch was in
    flight."""


class NoReadyWorkerError(RuntimeError):
    """No worker has the model ready right now (HTTP 503)."""


class BatchFailedError(RuntimeError):
    """The model raised an error on this batch; the worker is still serving."""


class ModelUnavailableError(RuntimeError):
    """The worker cannot run this job for a reason it states (HTTP 503): the checkpoint an
    explanation needs is gone or was replaced (worker.CheckpointChangedError)."""


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
class ExplainResult:
    """Grad-CAM of one explain job, one row per image (see worker.Runner.explain)."""

    heatmaps: np.ndarray  # (N, S, S) float32 in [0, 1]
    targets: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float32
    overlays: list[bytes]  # PNG per image
    start: float  # time.monotonic() when the worker began
    explain_ms: float
    device: str


@dataclass
class ModelState:
    status: str = "loading"  # loading | ready | failed
    reason: str | None = None
    precision: str | None = None
    backend: str | None = None
    batch_size: int | None = None  # measured by the worker (IMGCLS_MAX_BATCH_SIZE=auto)
    jpeg_decode: dict[str, Any] | None = None  # the JPEG decoder by upload size (Decoder)
    reloading: bool = False  # loading again in a worker that was restarted


@dataclass(frozen=True)
class ModelStatus:
    """A model's state aggregated over the workers (and, in the service, its weights)."""

    status: str  # ready | loading | missing-weights | failed | not-loaded
    reason: str | None = None
    devices: tuple[str, ...] = ()
    precision: str | None = None
    backend: str | None = None


@dataclass
class Inflight:
    future: asyncio.Future[Any]  # BatchResult, or ExplainResult for an explain job
    sent_at: float | None = None  # monotonic; None while reserved but not yet sent
    limit_s: float | None = None  # the watchdog's limit for this job (explains: longer)
    model: str | None = None  # the model of a batch, once sent


@dataclass
class WorkerHandle:
    worker_id: int
    cfg: WorkerConfig
    plans: list[LoadPlan] = field(default_factory=list)  # what a (re)start loads
    process: Any = None
    inbox: Any = None
    outbox: Any = None
    reader: threading.Thread | None = None  # the thread reading outbox
    pid: int | None = None
    inflight: dict[int, Inflight] = field(default_factory=dict)
    models: dict[str, ModelState] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=lambda: {"crash": 0, "watchdog": 0})
    deaths: list[float] = field(default_factory=list)  # monotonic times of recent deaths
    alive: bool = False
    started: bool = False  # the process reported in (its imports are done)
    stopping: bool = False
    spawned_at: float = 0.0
    heartbeat: float = 0.0  # monotonic time of the last message of any kind
    kill_reason: str | None = None  # set by the watchdog before it kills the process
    device_memory: int = 0  # CUDA bytes allocated, as last reported
    building: str | None = None  # the model the worker said it is loading now
    load_deaths: dict[str, int] = field(default_factory=dict)  # deaths in a row, per model
    dropped: dict[str, str] = field(default_factory=dict)  # models left out of restarts: why

    @property
    def device(self) -> str:
        return self.cfg.device

    @property
    def loading(self) -> bool:
        """Starting, or a model is to load (a load asked for is queued behind what it runs):
        nothing is sent to it meanwhile."""
        return not self.started or any(s.status == "loading" for s in self.models.values())

    @property
    def building_now(self) -> bool:
        """Starting, or building a model it said it began: what the watchdog gives the start-up
        limit. A load only asked for is not (a hung worker never begins it: the limit would be
        IMGCLS_WORKER_STARTUP_TIMEOUT_S instead of IMGCLS_WORKER_TIMEOUT_S)."""
        return not self.started or self.building is not None


@dataclass
class Reservation:
    """A worker slot booked for one batch: send it with ``submit`` or give it back with
    ``release``."""

    worker: WorkerHandle
    batch_id: int
    future: asyncio.Future[BatchResult]


@dataclass
class _Waiter:
    name: str
    full: Callable[[], bool]
    future: asyncio.Future[Reservation | None]


@dataclass(frozen=True)
class WorkerSnapshot:
    worker_id: int
    device: str
    alive: bool
    pid: int | None
    restarts: dict[str, int]
    device_memory: int
    inflight: int


def resolve_devices(device: str) -> list[str]:
    if device == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if device == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise RuntimeError("IMGCLS_DEVICE=cuda but no CUDA device is visible")
        return [f"cuda:{i}" for i in range(n)]
    if device.startswith("cuda:"):  # checked here, not left to a worker that cannot start
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.removeprefix("cuda:")
        if not (index.isascii() and index.isdigit()) or int(index) >= n:
            raise RuntimeError(
                f"IMGCLS_DEVICE={device} but {n} CUDA device(s) are visible"
                + (f" (cuda:0 to cuda:{n - 1})" if n else "")
            )
    return [device]


def fail_futures(futures: Any, exc: BaseException) -> None:
    """Set ``exc`` on every future not yet done (the fan-out used wherever a batch fails)."""
    for fut in futures:
        if not fut.done():
            fut.set_exception(exc)


def _context(configs: list[WorkerConfig]) -> Any:
    """How workers start. On CPUs, forked from multiprocessing's fork server, a clean process
    that imported torch and the engine once (``app.engine.forkserver``): a worker starts, or
    restarts after a crash or a hang, ~4 s of a core sooner than a spawned one importing them
    (tests/test_engine.py's twenty restarts: 73 s spawned, 13 s forked, on 2 cores). CUDA
    workers are spawned, as before: workers forked from a server that imported torch (and must
    never have initialised CUDA) have not been tried on a GPU. Spawned too where there is no
    fork server (not POSIX), and where the server would import another ``app`` than this one:
    it starts with the working directory first on its path (Python < 3.12.8 ignores the API
    process's), so a user's ``app.py`` or ``app/`` there would be preloaded in its place and
    break every worker.

    Workers forked from the server see the environment the API process had when it started
    the server (its first worker; again after the server was restarted), not later changes to
    ``os.environ``."""
    if any(c.device.startswith("cuda") for c in configs):
        return mp.get_context("spawn")
    if "forkserver" not in mp.get_all_start_methods() or _shadowed_here():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["app.engine.forkserver"])
    return ctx


def _nothing() -> None:
    """What the process that ``_ready_server`` starts runs."""


def _ready_server(ctx: Any) -> None:
    """Start the fork server and wait until it has imported torch (seconds), on a thread: a
    worker's ``Process.start()`` waits for the server's answer, and would hold the event loop
    that long (the service answers /healthz while its workers start). A process that does
    nothing is forked and waited for. (A server killed later is started again by the next
    worker's restart, on the loop.)"""
    if ctx.get_start_method() != "forkserver":
        return
    probe = ctx.Process(target=_nothing, name="imgcls-fork-server-ready", daemon=True)
    probe.start()
    probe.join()
    probe.close()


def _shadowed_here() -> bool:
    """Something named ``app`` in the working directory that is not this package."""
    import importlib.machinery
    from pathlib import Path

    import app

    found = importlib.machinery.PathFinder.find_spec("app", [os.getcwd()])
    if found is None:
        return False
    ours = [Path(p).resolve() for p in app.__path__]
    where = found.submodule_search_locations or [found.origin or ""]
    return [Path(p).resolve() for p in where] != ours


class WorkerPool:
    def __init__(
        self,
        configs: list[WorkerConfig],
        worker_timeout_s: float = 60.0,
        startup_timeout_s: float = 900.0,
        backoff_s: float = 1.0,
        explain_timeout_s: float = 120.0,
    ) -> None:
        self._ctx = _context(configs)
        self.workers = [WorkerHandle(c.worker_id, c, list(c.plans)) for c in configs]
        self.worker_timeout_s = worker_timeout_s
        # An explanation (fp32 eager, forward and backward, its model built on first use) of a
        # VGG at 224 px takes seconds on a CPU: the watchdog gives it this long instead.
        self.explain_timeout_s = max(explain_timeout_s, worker_timeout_s)
        self.startup_timeout_s = max(startup_timeout_s, worker_timeout_s)
        self.backoff_s = backoff_s  # first delay of the back-off after repeated deaths
        self._batch_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._status_waiters: set[asyncio.Future[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False
        self._reap_fds = False

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(_ready_server, self._ctx)
        for w in self.workers:
            self._spawn(w)
        self._watchdog = asyncio.create_task(self._watch(), name="pool-watchdog")
        self._watchdog.add_done_callback(_log_task_death)
        # Workers ignore SIGTERM (the API process stops them: close()). A process that exits
        # without closing its pool (a second Ctrl-C skips the lifespan shutdown) kills them
        # here, before multiprocessing's exit hook, which would SIGTERM them and wait forever.
        atexit.register(self._kill_left)

    def _kill_left(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                if _is_alive(w.process):
                    w.process.kill()

    def _spawn(self, w: WorkerHandle) -> None:
        w.inbox = self._ctx.Queue()
        w.outbox = self._ctx.Queue()
        again = sum(w.restarts.values()) > 0  # a restart, not the pool's start
        w.models = {p.name: ModelState(reloading=again) for p in w.plans}
        w.models |= {name: ModelState("failed", why) for name, why in w.dropped.items()}
        w.building = None
        cfg = replace(w.cfg, plans=list(w.plans), start_method=self._ctx.get_start_method())
        w.process = self._ctx.Process(
            target=worker_main,
            args=(cfg, w.inbox, w.outbox),
            name=f"imgcls-worker-{w.worker_id}",
            daemon=True,
        )
        w.process.start()
        w.alive, w.started, w.kill_reason, w.pid = True, False, None, w.process.pid
        w.spawned_at = w.heartbeat = time.monotonic()
        w.reader = threading.Thread(
            target=self._read, args=(w, w.process, w.outbox), daemon=True, name="pool-reader"
        )
        w.reader.start()

    async def close(self, grace_s: float = 10.0) -> None:
        self._closed = True
        atexit.unregister(self._kill_left)
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        for w in self.workers:
            w.stopping = True
            if _is_alive(w.process):
                with contextlib.suppress(Exception):
                    w.inbox.put(None)
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            if _is_alive(w.process):
                remaining = max(0.0, deadline - time.monotonic())
                await asyncio.to_thread(w.process.join, remaining)
            if _is_alive(w.process):
                doing = (
                    f"building {w.building}" if w.building
                    else "starting" if not w.started
                    else "running a batch"
                )  # fmt: skip
                log.warning("worker %s did not stop within %.0f s (%s): killed",
                            w.worker_id, grace_s, doing)  # fmt: skip
                w.process.kill()
                await asyncio.to_thread(w.process.join, 5)
            self._fail_inflight(w, WorkerCrashedError("the service is shutting down"))
            # the queues' locks and semaphores go now, not at exit, when the resource tracker
            # would warn of "leaked semaphore objects" at every stop; the reader first (it ends
            # within a poll of the dead process), so no read is in progress on a closed queue
            if w.reader is not None:
                await asyncio.to_thread(w.reader.join, 2)
            self._release_process(w)
            w.inbox = w.outbox = w.process = w.reader = None
        fail_futures((x.future for x in self._waiters), NoReadyWorkerError("shutting down"))
        self._waiters.clear()

    # ---- reader thread ---------------------------------------------------------------------
    def _read(self, w: WorkerHandle, process: Any, outbox: Any) -> None:
        try:
            while True:
                try:
                    msg = outbox.get(timeout=0.2)
                except queue.Empty:
                    if not _is_alive(process):
                        break
                    continue
                except (EOFError, OSError, ValueError):  # ValueError: the queue was closed
                    break
                self._call(self._on_message, w, process, msg)
        except BaseException:  # an unpickling error, say: the worker cannot be heard any more
            log.exception("reader of worker %s failed; restarting the worker", w.worker_id)
            with contextlib.suppress(Exception):
                process.kill()
        finally:  # whatever ended the loop, the death is handled (and the worker restarted)
            self._call(self._on_exit, w, process)

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(fn, *args)

    def _on_message(self, w: WorkerHandle, process: Any, msg: tuple[Any, ...]) -> None:
        if process is not w.process:
            return  # a message from the previous process of this slot
        w.heartbeat = time.monotonic()
        kind = msg[0]
        if kind == "result":
            _, batch_id, probs, start, ms, (precision, backend, memory), items = msg
            w.device_memory = memory
            entry = self._finished(w, batch_id)
            # What ran: a compiled model that failed at run time runs eager from then on, and
            # /models says so as its answers do.
            st = w.models.get(entry.model) if entry is not None and entry.model else None
            if st is not None and backend:
                st.backend = backend
            # The slot first: the batcher sends the next batch before this one's answers are built.
            self._dispatch()
            if entry is not None and not entry.future.done():
                entry.future.set_result(
                    BatchResult(probs, start, ms, w.device, precision, backend, items)
                )
        elif kind == "explained":
            _, batch_id, heatmaps, targets, scores, overlays, start, ms = msg
            entry = self._finished(w, batch_id)
            self._dispatch()
            if entry is not None and not entry.future.done():
                entry.future.set_result(
                    ExplainResult(heatmaps, targets, scores, overlays, start, ms, w.device)
                )
        elif kind == "error":
            _, batch_id, detail, why = msg
            entry = self._finished(w, batch_id)
            if entry is not None and not entry.future.done():
                error = ModelUnavailableError if why == "unavailable" else BatchFailedError
                entry.future.set_exception(error(detail))
            self._dispatch()
        elif kind == "status":
            _, name, status, reason, info = msg
            if status == "unloaded":
                w.models.pop(name, None)
            else:
                st = w.models.setdefault(name, ModelState())
                st.status, st.reason = status, reason
                if status == "loading":
                    w.building = name
                elif w.building == name:
                    w.building = None
                if status in ("ready", "failed"):  # the load ended: no death in a row
                    w.load_deaths.pop(name, None)
                if info:
                    st.precision, st.backend = info.get("precision"), info.get("backend")
                    st.batch_size = info.get("batch_size")
                    st.jpeg_decode = info.get("jpeg_decode")
                if status == "failed":
                    log.error("worker %s failed to load %s: %s", w.worker_id, name, reason)
            self._status_changed()
        elif kind == "started":
            w.started = True
            self._status_changed()
        # "heartbeat": the time stamp above is all it carries

    def _finished(self, w: WorkerHandle, batch_id: int) -> Inflight | None:
        """A job's answer came: its slot is free, and the job queued behind it at the worker
        (which takes its inbox in order) starts now, so its watchdog clock starts now too."""
        entry = w.inflight.pop(batch_id, None)
        now = time.monotonic()
        for other in w.inflight.values():
            if other.sent_at is not None:
                other.sent_at = now
        self._reap_shared_fds()
        return entry

    def _on_exit(self, w: WorkerHandle, process: Any) -> None:
        if process is not w.process:
            return
        w.alive = False
        if self._closed:  # close() has stopped the worker and released its process
            return
        code = process.exitcode
        reason = w.kill_reason or "crash"
        what = (
            f"worker {w.worker_id} on {w.device} stopped answering and was restarted"
            if reason == "watchdog"
            else f"worker {w.worker_id} on {w.device} died (exit code {code})"
        )
        told = (  # in the client's terms: which worker, exit codes and signals go to the log
            "the worker running this model stopped answering and was restarted"
            if reason == "watchdog"
            else "the worker running this model stopped unexpectedly and is being restarted"
        )
        self._fail_inflight(w, WorkerCrashedError(told))
        self._release_process(w)
        self._reap_fds = True
        self._reap_shared_fds()
        if w.stopping or self._closed:
            return
        self._count_load_death(w, what)
        w.restarts[reason] += 1
        # Restart at once after a single death; back off when it keeps dying (a model that
        # crashes while loading must not turn into a fork loop).
        now = time.monotonic()
        w.deaths = [t for t in w.deaths if now - t < 60.0] + [now]
        delay = 0.0 if len(w.deaths) <= 1 else min(30.0, self.backoff_s * 2 ** (len(w.deaths) - 2))
        log.error("%s; restarting in %.0fs", what, delay)
        assert self._loop is not None
        self._loop.call_later(delay, self._restart, w)
        self._status_changed()

    def _count_load_death(self, w: WorkerHandle, what: str) -> None:
        """A worker died while loading a model: the LOAD_DEATHS-th time in a row, it restarts
        without that model, which fails there (until it is loaded again)."""
        name, w.building = w.building, None
        if name is None:
            return
        n = w.load_deaths[name] = w.load_deaths.get(name, 0) + 1
        if n < LOAD_DEATHS:
            return
        del w.load_deaths[name]
        w.plans = [p for p in w.plans if p.name != name]
        w.dropped[name] = (
            f"the worker died {n} times in a row while loading it (last: {what}; killed for "
            "memory?); it restarted without it: load it again to retry"
        )
        w.models[name] = ModelState("failed", w.dropped[name])
        log.error("worker %s: %s %s", w.worker_id, name, w.dropped[name])

    def _release_process(self, w: WorkerHandle) -> None:
        """Close the dead process's queues (their feeder threads end) and its handle."""
        for q in (w.inbox, w.outbox):
            if q is None:
                continue
            with contextlib.suppress(Exception):
                q.cancel_join_thread()
                q.close()
        if w.process is not None:
            with contextlib.suppress(Exception):
                w.process.join(0)
                w.process.close()

    def _reap_shared_fds(self) -> None:
        """Close the descriptors of shared-memory batches that a dead worker never fetched.

        A pixel batch crosses to its worker as a file descriptor that Python's resource sharer
        holds until the receiver asks for it; a worker that dies first leaves it held for good.
        Stopping the sharer closes every held descriptor, so it is done only while no batch is on
        its way to any worker (the sharer starts again with the next batch)."""
        if not self._reap_fds:
            return
        if any(x.sent_at is not None for w in self.workers for x in w.inflight.values()):
            return  # try again when the batches in flight have been answered
        self._reap_fds = False
        with contextlib.suppress(Exception):
            resource_sharer.stop(timeout=1)

    def _restart(self, w: WorkerHandle, attempt: int = 1) -> None:
        if w.stopping or self._closed:
            return
        try:
            self._spawn(w)
        except Exception as exc:  # no process could be started (fds, memory): retry, loudly
            delay = min(30.0, self.backoff_s * 2 ** (attempt - 1)) or 1.0
            log.exception("worker %s could not be restarted (attempt %d); retrying in %.0fs",
                          w.worker_id, attempt, delay)  # fmt: skip
            reason = f"its worker could not be restarted: {type(exc).__name__}: {exc}"
            w.models = {p.name: ModelState("failed", reason) for p in w.plans}
            self._status_changed()
            assert self._loop is not None
            self._loop.call_later(delay, self._restart, w, attempt + 1)

    def _fail_inflight(self, w: WorkerHandle, exc: Exception) -> None:
        pending, w.inflight = w.inflight, {}
        fail_futures((x.future for x in pending.values()), exc)

    # ---- watchdog --------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            now = time.monotonic()
            for w in self.workers:
                if not w.alive or w.stopping or w.kill_reason:
                    continue
                limit = self.startup_timeout_s if w.building_now else self.worker_timeout_s
                overdue = [
                    now - x.sent_at
                    for x in w.inflight.values()
                    if x.sent_at is not None and now - x.sent_at > max(limit, x.limit_s or 0.0)
                ]
                if overdue:
                    self._kill(w, f"a batch has been in flight for {max(overdue):.0f}s")
                elif now - w.heartbeat > limit:
                    self._kill(w, f"no heartbeat for {now - w.heartbeat:.0f}s")

    def _kill(self, w: WorkerHandle, why: str) -> None:
        log.error(
            "watchdog: worker %s on %s is hung (%s, limit %gs); killing it",
            w.worker_id, w.device, why,
            self.startup_timeout_s if w.building_now else self.worker_timeout_s,
        )  # fmt: skip
        w.kill_reason = "watchdog"
        with contextlib.suppress(Exception):
            w.process.kill()  # the reader thread sees it die and _on_exit restarts it

    # ---- scheduling ------------------------------------------------------------------------
    def ready_workers(self, name: str) -> list[WorkerHandle]:
        return [
            w
            for w in self.workers
            if w.alive
            and not w.loading  # a worker building a model runs nothing else until it is done
            and (st := w.models.get(name)) is not None
            and st.status == "ready"
        ]

    def _busy_loading(self, name: str) -> bool:
        """A worker has ``name`` ready but is building another model (at start-up, or a load at
        run time), which it runs nothing else beside: batches for ``name`` wait for it."""
        return any(
            w.alive
            and w.loading
            and (st := w.models.get(name)) is not None
            and st.status == "ready"
            for w in self.workers
        )

    def poke(self) -> None:
        """Look again at the waiters (a batch became full: it may use a busy worker's second
        slot)."""
        self._dispatch()

    def _status_changed(self) -> None:
        for fut in self._status_waiters:
            if not fut.done():
                fut.set_result(None)
        self._dispatch()

    def _dispatch(self) -> None:
        """Give free slots to waiters, first come first served; fail waiters whose model has no
        ready worker."""
        if not self._waiters:
            return
        kept: collections.deque[_Waiter] = collections.deque()
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            ready = self.ready_workers(waiter.name)
            if not ready:
                if self._busy_loading(waiter.name):  # it serves again when the load is done
                    kept.append(waiter)
                    continue
                waiter.future.set_exception(
                    NoReadyWorkerError(
                        f"no worker has {waiter.name} ready (a worker restarting, or the model "
                        "failed or was unloaded)"
                    )
                )
                continue
            limit = MAX_INFLIGHT_FULL if waiter.full() else MAX_INFLIGHT_PER_WORKER
            free = [w for w in ready if len(w.inflight) < limit]
            if free:
                waiter.future.set_result(self._reserve(min(free, key=lambda w: len(w.inflight))))
            else:
                kept.append(waiter)
        self._waiters = kept

    def _reserve(self, w: WorkerHandle) -> Reservation:
        assert self._loop is not None
        batch_id = next(self._batch_ids)
        fut: asyncio.Future[BatchResult] = self._loop.create_future()
        w.inflight[batch_id] = Inflight(fut)
        return Reservation(w, batch_id, fut)

    async def acquire(
        self, name: str, deadline: float, full: Callable[[], bool] = lambda: False
    ) -> Reservation | None:
        """Book a slot on the least-busy worker holding ``name``: an idle one, or, while
        ``full()`` says the batch is full, one with a single batch in flight.

        Waiters are served in the order they came, whatever their model. None when no slot came
        free before ``deadline``; NoReadyWorkerError at once when no worker has the model ready
        (crashed, restarting), so requests fail fast.
        """
        assert self._loop is not None
        waiter = _Waiter(name, full, self._loop.create_future())
        self._waiters.append(waiter)
        self._dispatch()
        if not waiter.future.done():
            remaining = deadline - time.monotonic()
            timer = self._loop.call_later(max(0.0, remaining), _resolve_none, waiter.future)
            try:
                await asyncio.shield(waiter.future)
            except asyncio.CancelledError:
                if waiter.future.done() and not waiter.future.cancelled():
                    if (res := waiter.future.result()) is not None:
                        self.release(res)
                else:
                    waiter.future.cancel()
                raise
            finally:
                timer.cancel()
        return waiter.future.result()

    def release(self, res: Reservation) -> None:
        """Give back a slot that was reserved and never sent."""
        if res.future.done() and not res.future.cancelled():
            res.future.exception()  # its worker died first: nothing of the caller's was in it
        entry = res.worker.inflight.get(res.batch_id)
        if entry is not None and entry.sent_at is None:
            del res.worker.inflight[res.batch_id]
            if not res.future.done():
                res.future.cancel()
            self._dispatch()

    def submit(
        self, res: Reservation, name: str, batch: torch.Tensor | list[Any]
    ) -> asyncio.Future[BatchResult]:
        """Send a batch into its reserved slot: uint8 pixels in shared memory, or uploads to
        decode there; the future resolves with its result."""
        w = res.worker
        entry = w.inflight.get(res.batch_id)
        if entry is None:  # the worker died between the reservation and now
            if not res.future.done():
                res.future.set_exception(WorkerCrashedError(f"worker {w.worker_id} restarted"))
            return res.future
        try:
            w.inbox.put(("batch", res.batch_id, name, batch))
            entry.sent_at, entry.model = time.monotonic(), name
        except Exception as exc:
            w.inflight.pop(res.batch_id, None)
            if not res.future.done():
                res.future.set_exception(
                    WorkerCrashedError(f"cannot reach worker {w.worker_id}: {exc}")
                )
        return res.future

    def submit_explain(
        self, res: Reservation, name: str, pixels: torch.Tensor, target: int | None
    ) -> asyncio.Future[ExplainResult]:
        """Send an explain job (uint8 pixels (N, 3, S, S), a class index or None for top-1)
        into its reserved slot. It counts as a batch for the slot limits, and the watchdog and
        crash handling cover it like one (with ``explain_timeout_s`` as its limit)."""
        w = res.worker
        fut: asyncio.Future[ExplainResult] = res.future  # type: ignore[assignment]
        entry = w.inflight.get(res.batch_id)
        if entry is None:
            if not fut.done():
                fut.set_exception(WorkerCrashedError(f"worker {w.worker_id} restarted"))
            return fut
        try:
            w.inbox.put(("explain", res.batch_id, name, pixels, target))
            entry.limit_s = self.explain_timeout_s
            entry.sent_at = time.monotonic()
        except Exception as exc:
            w.inflight.pop(res.batch_id, None)
            if not fut.done():
                fut.set_exception(WorkerCrashedError(f"cannot reach worker {w.worker_id}: {exc}"))
        return fut

    # ---- models at run time ----------------------------------------------------------------
    def load(self, plan: LoadPlan) -> None:
        """Load a model on every worker (it serves when a worker reports it ready)."""
        for w in self.workers:
            w.plans = [p for p in w.plans if p.name != plan.name] + [plan]
            w.dropped.pop(plan.name, None)
            w.load_deaths.pop(plan.name, None)
            w.models[plan.name] = ModelState()
            if w.alive:
                with contextlib.suppress(Exception):
                    w.inbox.put(("load", plan))
        self._status_changed()

    def unload(self, name: str) -> None:
        """Stop serving ``name`` and free it on the workers (they report it unloaded)."""
        for w in self.workers:
            w.plans = [p for p in w.plans if p.name != name]
            w.load_deaths.pop(name, None)
            if w.dropped.pop(name, None) is not None:  # not on the worker: nothing to free
                w.models.pop(name, None)
                continue
            if name in w.models:
                w.models[name].status = "unloading"
                if w.alive:
                    with contextlib.suppress(Exception):
                        w.inbox.put(("unload", name))
                else:
                    w.models.pop(name, None)
        self._status_changed()

    async def wait_status(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``done()`` holds (checked at each status change) or ``deadline``."""
        assert self._loop is not None
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            fut: asyncio.Future[None] = self._loop.create_future()
            self._status_waiters.add(fut)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, remaining)
            finally:
                self._status_waiters.discard(fut)
        return True

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
        if not states:
            return ModelStatus("not-loaded", "not loaded on any worker")
        # a model loaded at run time on a worker that restarted long ago is just loading
        restarting = any(not w.alive or s.reloading for w, s in states)
        return ModelStatus(
            "loading", "worker restarting" if restarting else "loading and warming up"
        )

    def batch_size(self, name: str) -> int | None:
        """The batch size the ready workers measured for ``name`` (the smallest), if any."""
        sizes = [
            st.batch_size
            for w in self.workers
            if w.alive and (st := w.models.get(name)) and st.status == "ready" and st.batch_size
        ]
        return min(sizes) if sizes else None

    def jpeg_decode(self, name: str) -> dict[str, Any] | None:
        """What the first ready worker that timed its JPEG decoders picked for ``name``."""
        for w in self.workers:
            st = w.models.get(name)
            if w.alive and st is not None and st.status == "ready" and st.jpeg_decode:
                return st.jpeg_decode
        return None

    def fully_ready(self, name: str) -> bool:
        return all(
            w.alive and w.models.get(name, ModelState()).status == "ready" for w in self.workers
        )

    def snapshot(self) -> list[WorkerSnapshot]:
        return [
            WorkerSnapshot(w.worker_id, w.device, w.alive, w.pid, dict(w.restarts),
                           w.device_memory, len(w.inflight))
            for w in self.workers
        ]  # fmt: skip


def _is_alive(process: Any) -> bool:
    """False also for a process object already closed (after its death was handled)."""
    try:
        return process is not None and bool(process.is_alive())
    except ValueError:
        return False


def _resolve_none(fut: asyncio.Future[Reservation | None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _log_task_death(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s ended", task.get_name(), exc_info=task.exception())
