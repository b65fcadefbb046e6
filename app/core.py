"""The inference core that every front-end calls: classify, compare, infer.

The FastAPI routes, the Ray Serve ingress and the Open Inference Protocol (REST and gRPC) differ
only in how they read a request and write an answer; what happens in between is here: the model
check, where an upload is decoded, the deadline, fail-fast fan-out, and building the results.
Subclasses say how a model runs (``run``): the worker pool's batchers in one process
(app/service.py), deployment handles on Ray Serve (app/ray_app.py).

No web framework is imported here; errors are the domain errors of app/errors.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from app import imaging
from app.catalog import Catalog, ModelSpec
from app.engine.batcher import ImageResult
from app.engine.decoding import Encoded, Item, decode_pixels, draft_side
from app.engine.explain import heatmap_similarity
from app.engine.pool import ExplainResult
from app.errors import (
    ElementError,
    ExplainQueueFullError,
    InvalidParameterError,
    ModelNotReadyError,
    NotAvailableError,
)
from app.preprocess import Preprocess
from app.responses import classify_result, compare_response, explain_result
from app.schemas import ClassifyResponse, CompareResponse, ExplainResponse, HeatmapSimilarity
from app.settings import Settings
from app.text import clip

T = TypeVar("T")

MAX_COMPARE = 8
MAX_NORMALISED = 1e4  # |value| of a client-normalised pixel (presets give within ~3)
EXPLAIN_METHODS = ("gradcam",)


@dataclass
class ServedModel:
    """A model this service was asked to serve, and what stops it from serving if anything."""

    spec: ModelSpec
    weights_label: str | None = None  # the enum name, the file, or "random"
    problem: str | None = None  # "missing-weights" | "failed"
    reason: str | None = None


@dataclass
class Pixels:
    """An upload decoded (once per reduction of the image) and resized for a set of models."""

    by_key: dict[tuple[object, ...], torch.Tensor]  # ModelSpec.transform_key -> uint8 (3, S, S)
    decode_ms: float
    preprocess_ms: float

    def of(self, spec: ModelSpec) -> torch.Tensor:
        return self.by_key[spec.transform_key]


def _pixels(
    data: imaging.BytesLike,
    max_pixels: int,
    transforms: Mapping[Any, Preprocess],
    draft: bool = False,
    probe: imaging.Probe | None = None,
) -> Pixels:
    return Pixels(*decode_pixels(data, max_pixels, transforms, draft, probe is not None, probe))


def parse_models(models: str | None, loaded: Sequence[str]) -> list[str]:
    """The models a /compare asks for: 2-8 distinct names, or the loaded ones (at most 8)."""
    if models is None:
        return list(loaded)[:MAX_COMPARE]
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not 2 <= len(names) <= MAX_COMPARE:
        raise InvalidParameterError(
            f"'models' must name 2 to {MAX_COMPARE} models, got {len(names)}"
        )
    if len(set(names)) != len(names):
        raise InvalidParameterError("'models' names a model twice")
    return names


async def gather_fail_fast(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the rest (their queued images are
    dropped instead of computed for nobody) and is raised."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
        if failed:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            exc = failed[0].exception()
            assert exc is not None
            raise exc
        return [t.result() for t in tasks]
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        raise


def check_method(method: str) -> str:
    if method not in EXPLAIN_METHODS:
        raise InvalidParameterError(
            f"unknown explanation method {method!r}; available: {', '.join(EXPLAIN_METHODS)}"
        )
    return method


def check_explainable(spec: ModelSpec) -> None:
    """Grad-CAM needs gradients through the model: quantized (int8) kernels have none."""
    if spec.precision == "int8":
        raise InvalidParameterError(
            f"{spec.name} runs in int8, whose quantized kernels have no gradients: "
            f"explain the float model ({spec.arch}) instead"
        )


def parse_target(target: str | int | None, spec: ModelSpec) -> int | None:
    """``top1`` (or None): each image's own top-1; otherwise a class index of ``spec``."""
    if target is None or target == "top1":
        return None
    # ASCII digits only: int() also takes " 3 ", "+3", "1_0" and other scripts' digits
    if isinstance(target, str) and not re.fullmatch(r"-?[0-9]{1,9}", target):
        raise InvalidParameterError(f"'target' must be top1 or a class index, got {clip(target)!r}")
    index = int(target)
    if not 0 <= index < spec.num_classes:
        raise InvalidParameterError(
            f"'target' {index} is not a class of {spec.name} (0..{spec.num_classes - 1})"
        )
    return index


@dataclass
class GatePlaces:
    left: int  # places taken in the explain gate (``reserve``) that no slot has used yet


class ExplainGate:
    """At most ``concurrency`` explanations at once and ``queue`` more waiting; past that,
    ExplainQueueFullError at once. Explanations take a worker slot each (seconds for a big
    model on a CPU), so this bound is what keeps them from starving classification.

    A request is checked for room before its body is read, and takes its places once the body
    is in (``reserve``, by the core before it decodes the upload): one decoding its upload
    counts as waiting, so a burst is refused before any of its images is decoded, and a slow
    upload holds no place while it arrives."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.limit = concurrency + queue
        self.count = 0  # reserved, running and waiting
        self._sem: asyncio.Semaphore | None = None  # made on the serving loop

    @contextlib.contextmanager
    def reserve(self, jobs: int = 1) -> Iterator[GatePlaces]:
        """Places for ``jobs`` explanations, taken now (or ExplainQueueFullError), for the
        slots opened with the reservation; those not used are given back at the end."""
        self.check(jobs)
        self.count += jobs
        reserved = GatePlaces(jobs)
        try:
            yield reserved
        finally:
            self.count -= reserved.left

    def check(self, jobs: int = 1) -> None:
        if jobs > self.limit:  # never fits, however long the client waits: not a 503
            raise InvalidParameterError(
                f"explanations of {jobs} models at once need IMGCLS_EXPLAIN_CONCURRENCY + "
                f"IMGCLS_EXPLAIN_QUEUE >= {jobs} (here {self.limit}); compare at most "
                f"{self.limit} models with explain"
            )
        if self.count + jobs > self.limit:
            raise ExplainQueueFullError(
                f"too many explanations in progress ({self.count} running or waiting, "
                f"IMGCLS_EXPLAIN_CONCURRENCY + IMGCLS_EXPLAIN_QUEUE = {self.limit}); retry shortly"
            )

    @contextlib.asynccontextmanager
    async def slot(self, reserved: GatePlaces) -> AsyncIterator[GateSlot]:
        """A place among the running explanations. An explanation whose client stopped waiting
        (its deadline passed) still runs on its worker: ``GateSlot.hold_until`` keeps the place
        taken until it ends, so explanations never run more than ``concurrency`` at once.
        It uses one of the places ``reserved`` (counted already)."""
        assert reserved.left > 0, "more slots than places reserved"
        reserved.left -= 1
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        try:
            await self._sem.acquire()
        except BaseException:
            self.count -= 1
            raise
        held = GateSlot()
        try:
            yield held
        finally:
            if held.job is not None and not held.job.done():
                held.job.add_done_callback(lambda _job: self._release())
            else:
                self._release()

    def _release(self) -> None:
        assert self._sem is not None
        self._sem.release()
        self.count -= 1


class DecodeMemory:
    """Bytes of decoded pixels this process may hold at once (IMGCLS_DECODE_MEMORY_MB): a
    decode reserves ``imaging.peak_bytes`` of its image before it starts and waits, first come
    first served, until that fits. Without it the API process held one decode per thread of
    asyncio's pool, up to 32 at 440 MB each. One image over the whole budget runs alone. A
    decode whose request stopped waiting (its deadline) keeps its bytes until its thread ends.
    One event loop: no lock."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def take(self, n: int) -> int:
        """Reserve ``n`` bytes (at most the whole budget), waiting for them; returns what was
        taken, for ``release``."""
        n = min(n, self.limit)
        if not self._waiting and self.used + n <= self.limit:
            self.used += n
            return n
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((n, turn))
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():  # granted as the request was cancelled
                self.release(n)
            else:  # cancelled while waiting (``_grant`` may have dropped it from the line)
                with contextlib.suppress(ValueError):
                    self._waiting.remove((n, turn))
                self._grant()  # those behind may fit now
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            n, turn = self._waiting[0]
            if turn.done():  # cancelled, its request not yet woken to leave the line: skip it
                self._waiting.popleft()
                continue
            if self.used + n > self.limit:
                return
            self._waiting.popleft()
            self.used += n
            turn.set_result(None)


@dataclasses.dataclass
class GateSlot:
    job: asyncio.Future[Any] | None = None  # the worker's job, while it outlives its request

    def hold_until(self, job: asyncio.Future[Any] | None) -> None:
        self.job = job


class InferenceCore(ABC):
    settings: Settings
    catalog: Catalog
    decode_in_worker: bool = False
    served: dict[str, ServedModel]
    _explain_gate: ExplainGate | None = None
    _decode_memory: DecodeMemory | None = None

    # ---- what a subclass provides ------------------------------------------------------------
    @abstractmethod
    def servable(self, name: str) -> ServedModel:
        """The served model called ``name``, or the domain error that says why it cannot run."""

    @abstractmethod
    async def run(self, name: str, payload: Item, deadline: float) -> ImageResult:
        """One image (uint8 pixels, normalised floats, or an upload to decode) through ``name``."""

    def enqueue(self, name: str, payload: Item, deadline: float) -> asyncio.Future[ImageResult]:
        """Queue one image now (``result`` waits for its answer): a request's images are queued
        together, right after their admission, so no other request's come between. Here: a
        task running ``run``."""
        return asyncio.ensure_future(self.run(name, payload, deadline))

    async def result(
        self, name: str, queued: asyncio.Future[ImageResult], deadline: float
    ) -> ImageResult:
        """The answer to an image ``enqueue`` queued."""
        return await queued

    def admit(self, name: str, images: int = 1) -> ServedModel:
        """Check, before any body is read, that ``name`` can take ``images`` more now."""
        return self.servable(name)

    async def run_explain(
        self,
        name: str,
        pixels: torch.Tensor,
        target: int | None,
        deadline: float,
        slot: GateSlot | None = None,
    ) -> ExplainResult:
        """Grad-CAM of uint8 pixels (3, S, S) through ``name`` for ``target`` (None: top-1).
        ``slot``: the explain gate's place, held until the worker's job ends."""
        raise NotAvailableError("explanations are not available on this backend")

    @property
    def explain_gate(self) -> ExplainGate:
        """One per core (made on first use: subclasses set ``settings`` in their own way)."""
        if self._explain_gate is None:
            s = self.settings
            self._explain_gate = ExplainGate(s.explain_concurrency, s.explain_queue)
        return self._explain_gate

    @property
    def decode_memory(self) -> DecodeMemory:
        """One per core (made on first use, as ``explain_gate``)."""
        if self._decode_memory is None:
            self._decode_memory = DecodeMemory(self.settings.decode_memory_bytes)
        return self._decode_memory

    def admit_explain(self, name: str, method: str, target: str | None = None) -> ServedModel:
        """Before the body is read: method and target valid, model ready, room in the explain
        queue."""
        check_method(method)
        served = self.servable(name)
        check_explainable(served.spec)
        parse_target(target, served.spec)
        self.explain_gate.check()
        return served

    def ready_models(self) -> list[str]:
        """The served models that can answer now (the default set of a /compare)."""
        ready = []
        for name in self.served:
            try:
                self.servable(name)
            except Exception:  # not ready, failed, missing weights: left out
                continue
            ready.append(name)
        return ready

    # ---- shared steps ----------------------------------------------------------------------
    @property
    def default_model(self) -> str:
        return self.settings.default

    def deadline(self, since: float | None = None) -> float:
        """When a request must be answered (``time.monotonic``): IMGCLS_REQUEST_TIMEOUT_S from
        ``since`` (``time.perf_counter()`` when its body was in: a wait to parse it counts),
        else from now."""
        waited = time.perf_counter() - since if since else 0.0
        return time.monotonic() - waited + self.settings.request_timeout_s

    @staticmethod
    async def by_deadline(deadline: float, step: Awaitable[T], what: str) -> T:
        """``step`` (checking or decoding uploads, on threads that may be busy), cut off at the
        request's deadline, which runs from when its body was read: 504, not a late answer."""
        try:  # a timeout scope: no task of its own per request, as wait_for would make
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await step
        except TimeoutError:
            raise TimeoutError(f"{what} did not finish within the request's deadline") from None

    async def explain_job(
        self,
        name: str,
        job: asyncio.Future[ExplainResult],
        deadline: float,
        slot: GateSlot | None,
    ) -> ExplainResult:
        """Wait for a running explain ``job`` until the request's deadline. A client that stops
        waiting does not stop the job: it keeps its place in the explain gate (``slot``) until it
        ends."""
        if slot is not None:
            slot.hold_until(job)
        try:
            return await asyncio.wait_for(
                asyncio.shield(job), max(0.001, deadline - time.monotonic())
            )
        except TimeoutError:
            raise TimeoutError(
                f"no explanation from {name} within IMGCLS_REQUEST_TIMEOUT_S="
                f"{self.settings.request_timeout_s:g}s"
            ) from None

    async def decode(self, data: imaging.BytesLike, specs: Sequence[ModelSpec]) -> Pixels:
        """Decode (once per reduction) and resize once per distinct geometry, on a thread
        (decoding and resizing release the GIL), once the header's promise of memory fits the
        decode budget (``DecodeMemory``; the largest decode's: they run one after another)."""
        s = self.settings
        transforms = {spec.transform_key: spec.transform for spec in specs}
        probe = await asyncio.to_thread(imaging.probe, data, s.max_pixels)
        side = draft_side(transforms) if s.jpeg_draft else None
        memory = self.decode_memory
        held = await memory.take(imaging.peak_bytes(probe, side))
        job = asyncio.ensure_future(
            asyncio.to_thread(_pixels, data, s.max_pixels, transforms, s.jpeg_draft, probe)
        )

        def done(job: asyncio.Future[Pixels]) -> None:
            memory.release(held)
            if not job.cancelled():
                job.exception()  # read: one its request stopped waiting for is not logged

        job.add_done_callback(done)
        return await asyncio.shield(job)  # cut off at the deadline, the thread still decodes

    async def encoded(self, data: imaging.BytesLike) -> Encoded:
        """Check an upload's header (the same 4xx answers as decoding) for a worker to decode.
        Off the event loop: a crafted file can make a header slow to parse."""
        probe = await asyncio.to_thread(imaging.probe, data, self.settings.max_pixels)
        return Encoded(data, probe.plain_jpeg, (probe.width, probe.height), probe.progressive)

    # ---- the operations ----------------------------------------------------------------------
    async def classify(
        self,
        upload: imaging.BytesLike,
        model: str | None,
        top_k: int,
        request_id: str,
        received: float | None = None,
    ) -> ClassifyResponse:
        """``received``: when the upload was in (``time.perf_counter``), where ``total`` starts
        (its form's parse, and any wait for a thread to parse it, count); else now."""
        started, deadline = received or time.perf_counter(), self.deadline(received)
        served = self.servable(model or self.default_model)
        spec = served.spec
        if self.decode_in_worker:
            encoded = await self.by_deadline(deadline, self.encoded(upload), "checking the upload")
            result = await self.run(spec.name, encoded, deadline)
            decode_ms, preprocess_ms = result.decode_ms or 0.0, result.preprocess_ms or 0.0
        else:
            pixels = await self.by_deadline(
                deadline, self.decode(upload, [spec]), "decoding the upload"
            )
            result = await self.run(spec.name, pixels.of(spec), deadline)
            decode_ms, preprocess_ms = pixels.decode_ms, pixels.preprocess_ms
        return classify_result(
            spec, served.weights_label, result, top_k, decode_ms=decode_ms,
            preprocess_ms=preprocess_ms, started=started, request_id=request_id,
        )  # fmt: skip

    async def _explain_one(
        self,
        spec: ModelSpec,
        pixels: torch.Tensor,
        target: int | None,
        deadline: float,
        reserved: GatePlaces,
    ) -> tuple[ExplainResult, float]:
        """Through the explain gate, on a place ``reserved``; returns the result and its queue
        time (ms)."""
        waited = time.monotonic()
        async with self.explain_gate.slot(reserved) as slot:
            result = await self.run_explain(spec.name, pixels, target, deadline, slot)
        return result, max(0.0, result.start - waited) * 1000.0

    async def explain(
        self,
        upload: imaging.BytesLike,
        model: str | None,
        method: str,
        target: str | None,
        heatmap: bool,
        request_id: str,
        received: float | None = None,
    ) -> ExplainResponse:
        """Where ``model`` looked in ``upload`` for ``target`` (top1 or a class index);
        ``received`` as for ``classify``."""
        started, deadline = received or time.perf_counter(), self.deadline(received)
        check_method(method)
        spec = self.servable(model or self.default_model).spec
        check_explainable(spec)
        index = parse_target(target, spec)
        with self.explain_gate.reserve() as reserved:  # its place, before it is decoded
            pixels = await self.by_deadline(
                deadline, self.decode(upload, [spec]), "decoding the upload"
            )
            result, queue_ms = await self._explain_one(
                spec, pixels.of(spec), index, deadline, reserved
            )
        return explain_result(
            spec, method, result, heatmap=heatmap, decode_ms=pixels.decode_ms,
            preprocess_ms=pixels.preprocess_ms, queue_ms=queue_ms, started=started,
            request_id=request_id,
        )  # fmt: skip

    async def compare(
        self,
        upload: imaging.BytesLike,
        models: str | None,
        top_k: int,
        request_id: str,
        explain: str | None = None,
        received: float | None = None,
    ) -> CompareResponse:
        """``received`` as for ``classify``."""
        started, deadline = received or time.perf_counter(), self.deadline(received)
        served = [self.servable(n) for n in parse_models(models, self.ready_models())]
        if not served:
            raise ModelNotReadyError("no model is ready to compare; see /readyz", retry_after=5)
        if explain is None:
            return await self._compare(upload, served, top_k, request_id, started, deadline)
        check_method(explain)
        for s in served:
            check_explainable(s.spec)
        with self.explain_gate.reserve(len(served)) as reserved:  # before it is decoded
            return await self._compare(
                upload, served, top_k, request_id, started, deadline, (explain, reserved)
            )

    async def _compare(
        self,
        upload: imaging.BytesLike,
        served: list[ServedModel],
        top_k: int,
        request_id: str,
        started: float,
        deadline: float,
        explaining: tuple[str, GatePlaces] | None = None,
    ) -> CompareResponse:
        """``compare``'s work, with ``explaining``: the method and the explain gate's places."""
        # Decoded here, whatever IMGCLS_DECODE says: models share the pixels of one reduction.
        specs = [s.spec for s in served]
        pixels = await self.by_deadline(deadline, self.decode(upload, specs), "decoding the upload")

        async def timed(s: ServedModel) -> tuple[ImageResult, float]:
            result = await self.run(s.spec.name, pixels.of(s.spec), deadline)
            return result, time.perf_counter()

        done = await gather_fail_fast([timed(s) for s in served])
        results = [
            classify_result(
                s.spec, s.weights_label, r, top_k, decode_ms=pixels.decode_ms,
                preprocess_ms=pixels.preprocess_ms, started=started,
                finished=finished,  # each model's total ends when its own result arrived
                request_id=request_id,
            )
            for s, (r, finished) in zip(served, done, strict=True)
        ]  # fmt: skip
        explained: list[ExplainResult] = []
        if explaining is not None:
            explain, reserved = explaining
            # Each model explains its own top-1 (as /classify answered it), one job per model.
            jobs = await gather_fail_fast(
                [
                    self._explain_one(
                        s.spec, pixels.of(s.spec), r.predictions[0].index, deadline, reserved
                    )
                    for s, r in zip(served, results, strict=True)
                ]
            )
            for s, r, (e, queue_ms) in zip(served, results, jobs, strict=True):
                r.explanation = explain_result(
                    s.spec, explain, e, heatmap=False, decode_ms=pixels.decode_ms,
                    preprocess_ms=pixels.preprocess_ms, queue_ms=queue_ms, started=started,
                    request_id=request_id,
                )  # fmt: skip
                explained.append(e)
        response = compare_response(
            [s.spec for s in served], [r for r, _ in done], results, top_k,
            decode_ms=pixels.decode_ms, started=started, request_id=request_id,
        )  # fmt: skip
        if explaining is not None:
            response.agreement.heatmap_similarity = similarities(
                [s.spec for s in served], explained
            )
        return response

    async def infer(
        self,
        name: str,
        items: Sequence[imaging.BytesLike | torch.Tensor],
        deadline: float | None = None,
    ) -> list[ImageResult]:
        """N images through one model, batched with everyone else's. A ``bytes`` item is an
        encoded image file, checked and decoded exactly as /classify does; a tensor is uint8
        pixels or float32 already normalised for the model, (3, S, S). A failing image raises
        ElementError naming its index; the others are cancelled."""
        served = self.admit(name, len(items))
        spec = served.spec
        deadline = deadline or self.deadline()

        async def prepare(i: int, item: imaging.BytesLike | torch.Tensor) -> Item:
            try:
                if isinstance(item, torch.Tensor):
                    return _check_tensor(item, spec)
                if self.decode_in_worker:
                    return await self.encoded(item)
                return (await self.decode(item, [spec])).of(spec)
            except Exception as exc:
                raise ElementError(i, exc) from exc

        payloads = await self.by_deadline(
            deadline, gather_fail_fast([prepare(i, x) for i, x in enumerate(items)]),
            "checking the images",
        )  # fmt: skip
        self.admit(name, len(payloads))  # again: the queue may have filled while they decoded
        # Queued here, all at once, right after that check: queued one by one in tasks, two
        # requests could both pass it, then each lose some of its images to a full queue.
        queued: list[asyncio.Future[ImageResult]] = []
        try:
            for i, payload in enumerate(payloads):
                try:
                    queued.append(self.enqueue(spec.name, payload, deadline))
                except Exception as exc:
                    raise ElementError(i, exc) from exc

            async def one(i: int, answer: asyncio.Future[ImageResult]) -> ImageResult:
                try:
                    return await self.result(spec.name, answer, deadline)
                except Exception as exc:
                    raise ElementError(i, exc) from exc

            return await gather_fail_fast([one(i, f) for i, f in enumerate(queued)])
        finally:
            for answer in queued:  # the ones not answered (another failed, the client left)
                answer.cancel()  # are dropped from the queue, not computed for nobody


def similarities(
    specs: Sequence[ModelSpec], results: Sequence[ExplainResult]
) -> list[HeatmapSimilarity]:
    """Pearson correlation of the heatmaps of every two models that saw the same pixels
    (equal ``transform_key``); maps on different crops are not comparable pixel by pixel."""
    out = []
    for (sa, ra), (sb, rb) in itertools.combinations(zip(specs, results, strict=True), 2):
        if sa.transform_key != sb.transform_key:
            continue
        r = heatmap_similarity(ra.heatmaps[0], rb.heatmaps[0])
        out.append(HeatmapSimilarity(a=sa.name, b=sb.name, pearson=round(r, 6)))
    return out


def _check_tensor(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    size = spec.input_size
    if x.shape != (3, size, size):
        raise InvalidParameterError(
            f"{spec.name} takes images of shape [3, {size}, {size}], got {list(x.shape)}"
        )
    if x.dtype == torch.uint8:
        return x
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise InvalidParameterError("the image tensor holds NaN or infinite values")
    if x.abs().max() > MAX_NORMALISED:  # finite, but overflows inside the model (NaN out)
        raise InvalidParameterError(
            f"normalised pixel values must lie within ±{MAX_NORMALISED:g} "
            "(a model's preset gives values within a few units)"
        )
    return x
