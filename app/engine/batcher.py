"""Dynamic batching per model across concurrent requests.

A batch closes when it holds ``max_batch_size`` images or ``max_wait`` after its first image
arrived, whichever comes first (the remaining time is recomputed on every pass, as Ray Serve's
batcher does). While every worker is busy, more images join the batch up to its maximum. A full
batch may also be queued at a worker that is still running one (see pool.acquire): the worker
starts it the moment it finishes, with no round trip through this process in between. A batch
that waited for its worker while the model's last batch ran there waits a moment more for the
clients that batch answered (``ModelBatcher._merge``: closed-loop clients otherwise settle into
half-full batches). Each
request's future receives its own row of probabilities or the exception that failed its batch.
Requests whose deadline passed or whose client went away are dropped before the batch is formed.

The loop survives anything one batch can throw at it: the batch's images fail, the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from app.engine.decoding import Item
from app.engine.observer import EngineObserver, NullObserver
from app.engine.pool import (
    BatchFailedError,
    BatchResult,
    NoReadyWorkerError,
    Reservation,
    WorkerPool,
    fail_futures,
)
from app.engine.stats import ModelStats
from app.imaging import ImageError, ImageTooLargeError

log = logging.getLogger("imgcls.batcher")

# A batch that waited for its worker waits at most IMGCLS_BATCH_MERGE_SHARE of the last forward
# pass, and at most this long, for the clients the last batch answered (ModelBatcher._merge).
MERGE_CAP_S = 0.05


# |value| of a normalised pixel past which a model's overflow is put down to the input (presets
# give values within about ±3)
PLAUSIBLE_NORMALISED = 10.0
# How early a wait for a deadline may end: uvloop (uvicorn's loop) runs libuv's timers, in whole
# milliseconds from a clock read at the start of the loop's iteration, so a request's wait ended
# up to ~1 ms before its deadline by time.monotonic(). A request gone within this of its
# deadline is counted as dropped at its deadline, not as a client that went away.
TIMER_SLACK_S = 0.005


class QueueFullError(RuntimeError):
    """The model's queue is at its bound; the client should retry later (HTTP 503)."""


class NoWorkerError(RuntimeError):
    """No worker can run this model right now (HTTP 503)."""


@dataclass
class ImageResult:
    """One image's answer from the engine."""

    probs: np.ndarray  # (classes,) float32
    batch_size: int
    queue_ms: float
    inference_ms: float
    device: str
    precision: str
    backend: str
    decode_ms: float | None = None  # set when the worker decoded the upload
    preprocess_ms: float | None = None


@dataclass
class _Item:
    payload: Item
    future: asyncio.Future[ImageResult]
    submitted: float
    deadline: float


class ModelBatcher:
    def __init__(
        self,
        name: str,
        pool: WorkerPool,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        observer: EngineObserver | None = None,
        merge_share: float = 0.1,
    ) -> None:
        self.name = name
        self.observer: EngineObserver = observer or NullObserver()
        self.pool = pool
        self._max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.merge_share = merge_share
        self._queue: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False
        # the last batch: how many images it answered and how long its forward pass took
        # (``_merge``)
        self._last_answered = 0
        self._last_inference_s = 0.0
        self._answered_at = float("-inf")
        self.stats = ModelStats()  # Triton's statistics extension (/v2/models/NAME/stats)

    @property
    def max_batch_size(self) -> int:
        """The size the workers measured fastest (IMGCLS_MAX_BATCH_SIZE=auto), else the
        configured one."""
        return self.pool.batch_size(self.name) or self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self._max_batch_size = value

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        log.error("batcher for %s ended unexpectedly; restarting it", self.name, exc_info=exc)
        self._fail_queue(NoWorkerError(f"batching for {self.name} restarted; retry"))
        self.start()

    async def stop(
        self, why: str = "the service is shutting down", within_s: float | None = None
    ) -> None:
        """Stop batching; what is still queued fails with NoWorkerError(``why``) (503). The
        batches at the workers are waited for, at most ``within_s``: one at a hung worker ends
        when the pool fails it (the watchdog, or the pool closing)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._running:
            await asyncio.wait(list(self._running), timeout=within_s)
        self._fail_queue(NoWorkerError(why))

    async def drain(self, within_s: float) -> None:
        """Wait (at most ``within_s``) until every queued image has been answered."""
        waiting = [i.future for i in self._queue] + list(self._running)
        if waiting:
            await asyncio.wait(waiting, timeout=within_s)

    def room(self) -> int:
        """How many more images the queue takes now."""
        return max(0, self.max_queue - len(self._queue))

    def admit(self, images: int = 1) -> None:
        """Raise QueueFullError unless ``images`` more fit in the queue now (checked before a
        request's body is read, and again when its images are queued)."""
        if images > self.room():
            raise QueueFullError(f"the queue for {self.name} is full ({self.max_queue} images)")

    def submit(self, payload: Item, deadline: float) -> asyncio.Future[ImageResult]:
        """Queue uint8 pixels (3, S, S), normalised floats, or an upload for the worker to
        decode."""
        self.admit(1)
        fut: asyncio.Future[ImageResult] = asyncio.get_running_loop().create_future()
        submitted = time.monotonic()
        fut.add_done_callback(lambda f: self._count_failure(f, submitted))
        self._queue.append(_Item(payload, fut, submitted, deadline))
        self._arrived.set()
        if len(self._queue) == self.max_batch_size:
            self.pool.poke()  # a full batch may go to a busy worker's second slot
        return fut

    def _count_failure(self, fut: asyncio.Future[ImageResult], submitted: float) -> None:
        """Every way an image can fail (its decode, a deadline, a client gone, a failed batch,
        the model unloaded) ends its future: counted here, once. Answers are counted where they
        are set, with their times."""
        if fut.cancelled() or fut.exception() is not None:
            self.stats.image_failed(int((time.monotonic() - submitted) * 1e9))

    def _drop_stale(self) -> None:
        now = time.monotonic()
        kept: collections.deque[_Item] = collections.deque()
        for item in self._queue:
            if item.deadline <= now:  # its request answered 504, or answers it now
                if not item.future.done():
                    item.future.set_exception(TimeoutError("request deadline passed in the queue"))
                self.observer.image_dropped(self.name, "deadline")
                continue
            if item.future.done():  # its wait ended: at its deadline, or the client went away
                early = item.deadline - now  # uvloop's timers end waits up to ~1 ms early
                reason = "deadline" if early <= TIMER_SLACK_S else "cancelled"
                self.observer.image_dropped(self.name, reason)
                continue
            kept.append(item)
        self._queue = kept

    async def _wait_for_items(self, within: float | None) -> None:
        self._arrived.clear()
        if within is None:
            await self._arrived.wait()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), within)

    async def _loop(self) -> None:
        while True:
            try:
                await self._next_batch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one batch end batching for the model
                log.exception("batcher for %s: unexpected error; failing the queued images",
                              self.name)  # fmt: skip
                self._fail_queue(BatchFailedError(f"{type(exc).__name__}: {exc}"))

    async def _next_batch(self) -> None:
        self._drop_stale()
        if not self._queue:
            await self._wait_for_items(None)
            return
        await self._gather(self.max_batch_size, self._queue[0].submitted + self.max_wait_s)
        latest = max(i.deadline for i in self._queue)
        asked = time.monotonic()
        try:
            slot = await self.pool.acquire(self.name, latest, self._full)
        except NoReadyWorkerError as exc:
            self._fail_queue(NoWorkerError(str(exc)))
            return
        if slot is None:
            self._drop_stale()
            return
        try:  # the slot is given back on every way out but a batch sent into it
            await self._merge(slot, asked)
            if slot.future.done():  # its worker died meanwhile: the images ask again
                self.pool.release(slot)  # (consumes the crash: no batch of ours was in it)
                return
            self._drop_stale()  # what waited past its deadline gets 504 and is not computed
            if not self._queue:
                self.pool.release(slot)
                return
            items = [self._queue.popleft() for _ in range(min(self.max_batch_size, self.depth))]
            task = asyncio.create_task(self._run_batch(slot, items))
        except BaseException:  # stopped (a model unloaded) while holding the worker's slot
            self.pool.release(slot)
            raise
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        # Let the dispatch reach the worker before gathering the next batch.
        await asyncio.sleep(0)

    async def _merge(self, slot: Reservation, asked: float) -> None:
        """Keep the free worker a moment for the clients the last batch answered.

        Clients that send their next image when answered (a closed loop: a UI, a load test, a
        pipeline) fall into cohorts: when a batch closes while the worker is busy, its images
        wait for the worker, and the clients answered meanwhile come back during the next
        forward pass, to wait in turn. Such cohorts last: two groups of 8 clients at a batch
        limit of 16 ran batches of 8, each slower per image than a batch of 16 (one cohort's
        uploads are received, on the same cores, during the other's forward pass; resnet50
        int8 on a 2-core CPU, split against merged: 25.9 against 30.2 images/s in one run,
        29.1 against 29.8 in another; bench/cohorts.py, docs/PERFORMANCE.md). So a batch that
        waited for its worker while this model's last batch ran there, and is not full, waits
        a little longer, up to ``merge_share`` of that forward pass (at most MERGE_CAP_S), for
        as many more images as that batch answered (up to the batch limit): the cohorts become
        one and the batches full again.

        Bounded: at most one such wait per batch, so the worker idles at most
        share / (1 + share) of the time (9% at the default) where the clients do not come
        back (open-loop traffic); a worker that was idle, or busy with another model, or a
        last batch that failed, waits for nothing. The last batch's figures are set before
        this runs: the pool frees the slot when the batch's result arrives, and the batch's
        own task (``_compute``) takes the result first."""
        waited = time.monotonic() - asked
        answered_since = self._answered_at >= asked  # this model's last batch freed the slot
        if self.merge_share <= 0 or waited < max(self.max_wait_s, 0.001) or not answered_since:
            return
        back = sum(i.submitted >= self._answered_at for i in self._queue)
        expected = min(self.max_batch_size, len(self._queue) - back + self._last_answered)
        until = time.monotonic() + min(MERGE_CAP_S, self.merge_share * self._last_inference_s)

        def wake(_: object) -> None:  # the worker died: stop waiting for it at once
            self._arrived.set()

        slot.future.add_done_callback(wake)
        try:
            await self._gather(expected, until, lambda: slot.future.done() or self._stopping)
        finally:
            slot.future.remove_done_callback(wake)

    async def _gather(
        self, target: int, until: float, abandon: Callable[[], bool] = lambda: False
    ) -> None:
        """Wait until the queue holds ``target`` images or the clock reaches ``until`` (or,
        checked at each wake-up, ``abandon()`` is true)."""
        while len(self._queue) < target and not abandon():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            await self._wait_for_items(remaining)

    def _full(self) -> bool:
        return len(self._queue) >= self.max_batch_size

    def _fail_queue(self, exc: Exception) -> None:
        items, self._queue = self._queue, collections.deque()
        fail_futures((i.future for i in items), exc)

    async def _run_batch(self, slot: Reservation, items: list[_Item]) -> None:
        try:
            await self._compute(slot, items)
        except Exception as exc:
            self.pool.release(slot)  # a slot booked and never sent is free again (else a no-op)
            if not isinstance(exc, RuntimeError | TimeoutError):
                log.exception("batch for %s failed in the API process", self.name)
            fail_futures((i.future for i in items), exc)

    async def _compute(self, slot: Reservation, items: list[_Item]) -> None:
        payloads = [i.payload for i in items]
        # Pixels only: one stacked tensor in shared memory. With uploads (or images of mixed
        # kinds), the list itself, for the worker to decode and stack, pickled through the queue's
        # pipe: faster than one shared-memory blob, whose descriptor costs a round trip.
        tensors = [p for p in payloads if isinstance(p, torch.Tensor)]
        uniform = len(tensors) == len(payloads) and len({t.dtype for t in tensors}) == 1
        batch = (
            place_shared(self.pool, slot, tensors, f"the batch for {self.name}")
            if uniform
            else payloads
        )
        result: BatchResult = await self.pool.submit(slot, self.name, batch)
        arrived = time.monotonic()
        n = len(items)
        rows, errors, decode_ms, preprocess_ms = result.items or (list(range(n)), {}, None, None)
        if result.probs.shape[0] != len(rows) or len(rows) + len(errors) != n:
            # outputs must match inputs one to one
            raise BatchFailedError(f"worker returned {result.probs.shape[0]} rows for {n} images")
        if rows:  # none when no upload in the batch could be decoded: nothing ran
            self.observer.batch_ran(
                self.name, len(rows), result.inference_ms / 1000.0,
                [max(0.0, result.start - items[k].submitted) for k in rows],
            )  # fmt: skip
        for k, (status, message) in errors.items():
            error = ImageTooLargeError if status == 413 else ImageError
            fail_futures([items[k].future], error(message))
        finite = np.isfinite(result.probs).all(axis=1) if len(rows) else np.zeros(0, bool)
        answered: list[_Item] = []
        for row, k in enumerate(rows):
            item = items[k]
            if item.future.done():
                continue
            if not finite[row]:
                item.future.set_exception(self._non_finite(item.payload, result.precision))
                continue
            answered.append(item)
            item.future.set_result(
                ImageResult(
                    probs=result.probs[row],
                    batch_size=len(rows),
                    queue_ms=max(0.0, (result.start - item.submitted) * 1000.0),
                    inference_ms=result.inference_ms,
                    device=result.device,
                    precision=result.precision,
                    backend=result.backend,
                    decode_ms=decode_ms[k] if decode_ms else None,
                    preprocess_ms=preprocess_ms[k] if preprocess_ms else None,
                )
            )
        self._last_answered, self._last_inference_s = len(answered), result.inference_ms / 1000
        self._answered_at = time.monotonic()
        self._count_batch(result, items, rows, answered, arrived, decode_ms, preprocess_ms)

    def _count_batch(
        self,
        result: BatchResult,
        items: list[_Item],
        rows: list[int],
        answered: list[_Item],
        arrived: float,
        decode_ms: list[float] | None,
        preprocess_ms: list[float] | None,
    ) -> None:
        """The statistics of a batch and of its answered images (see stats.py)."""
        done = time.monotonic()

        def worker_ns(k: int) -> int:  # decoding and preprocessing in the worker
            ms = (decode_ms[k] if decode_ms else 0.0) + (preprocess_ms[k] if preprocess_ms else 0.0)
            return int(ms * 1e6)

        input_ns = {id(items[k]): worker_ns(k) for k in rows}
        infer_ns = int(result.inference_ms * 1e6)
        output_ns = int((done - arrived) * 1e9)
        self.stats.batch_ran(len(rows), sum(input_ns.values()), infer_ns, output_ns)
        for item in answered:
            self.stats.image_answered(
                total_ns=int((done - item.submitted) * 1e9),
                queue_ns=int(max(0.0, result.start - item.submitted) * 1e9),
                input_ns=input_ns[id(item)],
                infer_ns=infer_ns,
                output_ns=output_ns,
            )

    def _non_finite(self, payload: Item, precision: str) -> Exception:
        """Non-finite output. From pixel values the client normalised far beyond what a preset
        gives (within about ±3; finite, within core.MAX_NORMALISED), the values overflowed
        inside the model at its precision (fp16's largest number is 65,504): the client's
        values, 400. Otherwise (pixels the service prepared, or values in the usual range) the
        model itself is broken: a server fault."""
        if (
            isinstance(payload, torch.Tensor)
            and payload.is_floating_point()
            and float(payload.abs().max()) > PLAUSIBLE_NORMALISED
        ):
            return ImageError(
                f"{self.name} at {precision} overflows on these pixel values (its output is not "
                "finite); send values normalised as the model's preset does (within a few units)"
            )
        return BatchFailedError(f"{self.name} gave non-finite output")


def place_shared(
    pool: WorkerPool, slot: Reservation, tensors: list[torch.Tensor], what: str
) -> torch.Tensor:
    """``tensors`` stacked in shared memory for ``slot``'s worker, before the job is sent (in
    the queue's feeder thread a failure would lose it silently). On a failure (/dev/shm full)
    the slot goes back, or it is lost for good, and the job is a 503 (NoWorkerError)."""
    try:
        return stack_shared(tensors)
    except Exception as exc:
        pool.release(slot)
        log.error("%s could not be placed in shared memory: %s", what, exc)
        raise NoWorkerError(
            f"the server could not hand {what} to a worker ({type(exc).__name__}); retry shortly"
        ) from exc


def stack_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack into one tensor placed in shared memory, so the worker maps it instead of copying."""
    first = tensors[0]
    out = torch.empty((len(tensors), *first.shape), dtype=first.dtype).share_memory_()
    torch.stack(tensors, out=out)
    return out
