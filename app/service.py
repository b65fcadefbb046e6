"""The running service: catalog, weights, worker pool and one batcher per model.

It is the inference core (app/core.py) run by this process's worker pool: start-up, status,
admission, and loading or unloading models while serving. Every background task it starts has a
done-callback, so a failure is logged with its traceback and the models it affects turn
``failed`` with the reason, in /models and /readyz, instead of staying ``loading`` for good.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from app import weights as weights_mod
from app.catalog import Catalog, UnknownModelError
from app.catalog.custom import catalog_for
from app.core import GateSlot, InferenceCore, ServedModel
from app.engine import fastpath
from app.engine.batcher import ImageResult, ModelBatcher, place_shared
from app.engine.decoding import Item
from app.engine.observer import EngineObserver
from app.engine.plan import LoadPlan
from app.engine.pool import (
    ExplainResult,
    ModelStatus,
    NoReadyWorkerError,
    WorkerPool,
    WorkerSnapshot,
    resolve_devices,
)
from app.engine.worker import WorkerConfig
from app.errors import ModelNotReadyError, ModelNotServedError
from app.settings import Settings

log = logging.getLogger("imgcls.service")


@dataclass(frozen=True)
class ServiceSnapshot:
    """What the metrics collector reads at scrape time."""

    queue_depths: dict[str, int]
    model_counts: dict[str, int]  # status -> models
    workers: list[WorkerSnapshot]


class Service(InferenceCore):
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.settings = settings
        self.observer = observer
        if catalog is None:  # NAME:int8 by calibration where IMGCLS_INT8_CALIBRATION says
            catalog = catalog_for(settings.model_config_file, settings.int8_calibration)
        else:
            catalog.int8_calibration = settings.int8_calibration
        self.catalog = catalog
        self.served: dict[str, ServedModel] = {}
        for name in settings.model_names:
            self.served[name] = ServedModel(self.catalog.get(name))  # unknown names stop startup
        self.devices = resolve_devices(settings.device)
        for d in self.devices:  # raises for impossible combinations (fp16 on a CPU) before serving
            fastpath.resolve(settings.precision, settings.channels_last, settings.compile, d)
        self.decode_in_worker = settings.decode == "worker"
        self.pool: WorkerPool | None = None
        self.batchers: dict[str, ModelBatcher] = {}
        self.started = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._starting = True  # until the start-up task has made the pool and batchers
        self._download_threads = ThreadPoolExecutor(4, thread_name_prefix="imgcls-weights")
        self._downloads = weights_mod.Downloads()  # stopped, their files removed, at shutdown
        self._downloading: set[str] = set()  # models whose weights are being downloaded

    # ---- background tasks ------------------------------------------------------------------
    def _spawn(self, coro: Any, name: str, affects: list[str]) -> asyncio.Task[Any]:
        """A background task whose failure is loud: logged with its traceback, and the models it
        affects marked failed with the reason."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if t.cancelled() or t.exception() is None:
                return
            exc = t.exception()
            log.error("%s failed: %s", name, exc, exc_info=exc)
            for model in affects:
                served = self.served.get(model)
                if served is not None and model not in self.batchers:
                    served.problem, served.reason = "failed", f"{type(exc).__name__}: {exc}"

        task.add_done_callback(done)
        return task

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        torch.set_num_threads(1)  # the API process only decodes and resizes; workers own cores
        self._spawn(self._start(), "start-up", list(self.served))

    async def _resolve(self, served: ServedModel) -> LoadPlan | None:
        """The load plan of one model, or None (with the problem recorded) when it cannot run."""
        name = served.spec.name
        try:
            # a download on threads of its own: it may take minutes, and the default executor's
            # few threads decode and parse uploads; weights already here resolve on those
            path = await asyncio.get_running_loop().run_in_executor(
                self._download_threads if self._must_download(served) else None,
                functools.partial(
                    weights_mod.resolve,
                    served.spec,
                    self.settings.weights_dir,
                    auto_download=self.settings.auto_download,
                    allow_random=self.settings.allow_random_weights,
                    mirror=self.settings.weights_mirror,
                    downloads=self._downloads,
                ),
            )
        except weights_mod.WeightsError as exc:
            served.problem, served.reason = exc.problem, str(exc)
            log.error("%s", exc)
            return None
        except Exception as exc:  # an OSError from the weights folder, and anything else
            served.problem = "failed"
            served.reason = (
                f"{type(exc).__name__}: {exc} (weights folder {self.settings.weights_dir})"
            )
            log.error("%s: cannot resolve weights: %s", name, served.reason, exc_info=exc)
            return None
        served.problem = served.reason = None
        served.weights_label = weights_mod.weights_label(served.spec, path)
        if path is None:
            log.warning("%s serves RANDOM weights (IMGCLS_ALLOW_RANDOM_WEIGHTS)", name)
        return served.spec.load_plan(str(path) if path else None)

    def _configs(self, plans: list[LoadPlan]) -> list[WorkerConfig]:
        configs: list[WorkerConfig] = []
        per_device = self.settings.workers_per_device
        cores = os.cpu_count() or 1
        cpu_workers = sum(per_device for d in self.devices if d == "cpu")
        workers = len(self.devices) * per_device
        threads = self.settings.threads_per_worker or max(1, cores // max(1, cpu_workers))
        for device in self.devices:
            for _ in range(per_device):
                configs.append(
                    WorkerConfig.from_settings(
                        self.settings, device, worker_id=len(configs), threads=threads,
                        plans=plans, decode_in_worker=self.decode_in_worker,
                        decode_threads=decode_threads(device, cores, workers),
                    )
                )  # fmt: skip
        return configs

    async def _start(self) -> None:
        try:
            await self._start_pool()
        finally:
            self._starting = False

    def _must_download(self, served: ServedModel) -> bool:
        path = served.spec.weights_path(self.settings.weights_dir)
        return (
            self.settings.auto_download
            and bool(served.spec.weights_url)
            and path is not None
            and not path.is_file()
        )

    async def _start_pool(self) -> None:
        # The workers start with the models whose weights are here; one that must be downloaded
        # first joins when its download ends, so a slow or stalled mirror holds back only it.
        fetch = [s for s in self.served.values() if self._must_download(s)]
        here = [s for s in self.served.values() if s not in fetch]
        plans = [p for s in here if (p := await self._resolve(s)) is not None]
        self.pool = WorkerPool(
            self._configs(plans),
            worker_timeout_s=self.settings.worker_timeout_s,
            startup_timeout_s=self.settings.worker_startup_timeout_s,
            explain_timeout_s=self.settings.explain_timeout_s,
        )
        await self.pool.start()
        for plan in plans:
            self._add_batcher(plan.name)
        for served in fetch:
            name = served.spec.name
            self._spawn(self._download_and_load(served), f"download-{name}", [name])

    async def _download_and_load(self, served: ServedModel) -> None:
        name = served.spec.name
        self._downloading.add(name)
        try:
            # the download outside the model's lock: a repository load or unload of it meanwhile
            # is not held for the download's length (a load downloads beside, one at a time)
            plan = await self._resolve(served)
        finally:
            self._downloading.discard(name)
        if plan is None:
            return
        async with self._repository(name):
            if name not in self.batchers and self.served.get(name) is served:
                await self._load_one(served, plan)

    def _add_batcher(self, name: str) -> None:
        assert self.pool is not None
        b = ModelBatcher(
            name,
            self.pool,
            max_batch_size=self.settings.batch_cap,
            max_wait_s=self.settings.max_batch_wait_ms / 1000.0,
            max_queue=self.settings.max_queue,
            observer=self.observer,
            merge_share=self.settings.batch_merge_share,
        )
        b.start()
        self.batchers[name] = b

    async def stop(self) -> None:
        self._downloads.stop()  # at once: a download's thread is not the tasks' to cancel
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # IMGCLS_SHUTDOWN_GRACE_S bounds the whole: the batches at the workers, then the workers'
        # exit (a hung one is killed when it is up, not when the watchdog would)
        until = time.monotonic() + self.settings.shutdown_grace_s
        for b in self.batchers.values():
            await b.stop(within_s=max(0.0, until - time.monotonic()))
        if self.pool is not None:
            await self.pool.close(grace_s=max(0.0, until - time.monotonic()))
        self._download_threads.shutdown(wait=False, cancel_futures=True)

    # ---- models at run time (the model-repository extension) -------------------------------
    def _repository(self, name: str) -> asyncio.Lock:
        """One lock per model name: a load and an unload of one model never interleave."""
        return self._locks.setdefault(name, asyncio.Lock())

    def _check_started(self) -> WorkerPool:
        if self.pool is None or self._starting:
            raise ModelNotReadyError("the service is still starting; retry", retry_after=5)
        return self.pool

    async def load(self, name: str, timeout_s: float | None = None) -> ModelStatus:
        """Start serving ``name`` (a catalog model), downloading weights when allowed; returns
        when it is ready or has failed. Loading a model that serves already is a no-op; one
        whose load failed on every worker (a broken checkpoint, since replaced) is loaded again."""
        spec = self.catalog.get(name)  # UnknownModelError: 404
        async with self._repository(name):
            pool = self._check_started()
            served = self.served.setdefault(name, ServedModel(spec))
            if name not in self.batchers or self.status(name).status == "failed":
                # Shielded: a client that goes away does not leave the model half-loaded.
                task = self._spawn(self._load_one(served), f"load-{name}", [name])
                await asyncio.shield(task)
            if served.problem:
                return self.status(name)
            deadline = time.monotonic() + (timeout_s or self.settings.worker_startup_timeout_s)
            await pool.wait_status(
                lambda: self.status(name).status in ("ready", "failed"), deadline
            )
            return self.status(name)

    async def _load_one(self, served: ServedModel, plan: LoadPlan | None = None) -> None:
        """Resolve ``served``'s weights (unless ``plan`` says where they are) and load it."""
        assert self.pool is not None
        plan = plan or await self._resolve(served)
        if plan is None:
            return
        self.pool.load(plan)
        if plan.name not in self.batchers:  # a failed model loaded again keeps its own
            self._add_batcher(plan.name)

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404 at once, queued images are answered
        (the queue drains), then the workers free its memory."""
        async with self._repository(name):
            pool = self._check_started()
            served = self.served.get(name)
            if served is None:
                self.catalog.get(name)  # 404 for names not in the catalog
                return
            del self.served[name]
            batcher = self.batchers.pop(name, None)
            # the drain, and the batches at the workers, within IMGCLS_REQUEST_TIMEOUT_S; a hung
            # worker frees the model when it answers again (or is restarted without it)
            until = time.monotonic() + self.settings.request_timeout_s
            if batcher is not None:
                await batcher.drain(self.settings.request_timeout_s)
                await batcher.stop(
                    f"model {name!r} was unloaded before this image's turn came",
                    within_s=max(0.0, until - time.monotonic()),
                )
            pool.unload(name)
            await pool.wait_status(
                lambda: all(name not in w.models for w in pool.workers if w.alive),
                max(until, time.monotonic() + 5),
            )

    # ---- status ----------------------------------------------------------------------------
    def status(self, name: str) -> ModelStatus:
        """The status of any catalog model in this service."""
        served = self.served.get(name)
        if served is None:
            return ModelStatus("not-loaded", "not loaded by this service")
        if served.problem:
            return ModelStatus(served.problem, served.reason)
        if name in self._downloading:
            return ModelStatus("loading", "downloading weights")
        if self.pool is None or name not in self.batchers:
            return ModelStatus("loading", "resolving weights and starting workers")
        return self.pool.model_status(name)

    def is_ready(self) -> tuple[bool, list[str]]:
        not_ready = []
        for name in self.served:
            st = self.status(name)
            if st.status == "ready" and self.pool is not None and self.pool.fully_ready(name):
                continue
            what = st.status if st.status != "ready" else "restarting on some workers"
            not_ready.append(f"{name}: {what}" + (f" ({st.reason})" if st.reason else ""))
        return not not_ready, not_ready

    def batch_size(self, name: str) -> int:
        """The largest batch ``name`` runs in: measured (IMGCLS_MAX_BATCH_SIZE=auto) or set."""
        measured = self.pool.batch_size(name) if self.pool is not None else None
        return measured or self.settings.batch_cap

    def model_entry(self, name: str, labels: bool = True) -> dict[str, Any]:
        """Catalog fields, status and (optionally) labels of one model (UnknownModelError)."""
        spec = self.catalog.get(name)
        st = self.status(name)
        served = self.served.get(name)
        entry = spec.catalog_entry()
        entry.update(
            status=st.status,
            reason=st.reason,
            device=",".join(st.devices) or None,
            weights=served.weights_label if served else None,
            precision=st.precision,
            backend=st.backend,
            batch_size=self.batch_size(name) if st.status == "ready" else None,
            jpeg_decode=self.pool.jpeg_decode(name)
            if self.pool is not None and st.status == "ready"
            else None,
        )
        if labels:
            entry["labels"] = list(spec.labels)
        return entry

    def model_entries(self) -> list[dict[str, Any]]:
        names = dict.fromkeys([*self.catalog.names(), *self.served])
        return [self.model_entry(n, labels=False) for n in names]

    def repository_index(self) -> list[dict[str, Any]]:
        """Every catalog model with its state for the model-repository API: READY, LOADING or
        UNAVAILABLE (not loaded, missing weights, failed), and the reason."""
        states = {"ready": "READY", "loading": "LOADING"}
        out = []
        for name in dict.fromkeys([*self.catalog.names(), *self.served]):
            st = self.status(name)
            state = states.get(st.status, "UNAVAILABLE")
            reason = st.reason or ("" if st.status == "ready" else st.status)
            out.append({"name": name, "version": "1", "state": state, "reason": reason})
        return out

    def snapshot(self) -> ServiceSnapshot:
        counts: dict[str, int] = {}
        for name in self.served:
            st = self.status(name).status
            counts[st] = counts.get(st, 0) + 1
        return ServiceSnapshot(
            {name: b.depth for name, b in self.batchers.items()},
            counts,
            self.pool.snapshot() if self.pool is not None else [],
        )

    # ---- inference -------------------------------------------------------------------------
    def servable(self, name: str) -> ServedModel:
        served = self.served.get(name)
        if served is None:
            spec = self.catalog.get(name)  # raises UnknownModelError for names not in the catalog
            ready = [n for n in self.served if self.status(n).status == "ready"]
            raise ModelNotServedError(
                f"model {spec.name!r} is in the catalog but not loaded by this service; "
                f"models ready: {', '.join(ready) or 'none'} (add it to IMGCLS_MODELS, or load "
                f"it through the model repository API)"
            )
        st = self.status(name)
        if st.status != "ready":
            broken = st.status in ("missing-weights", "failed")
            # Why a model failed (paths, exceptions) is for its operator: /models/{name} and
            # /readyz say it; a client is told the state.
            why = f"; GET /models/{name} says why" if broken else (
                f" ({st.reason})" if st.reason else ""
            )  # fmt: skip
            raise ModelNotReadyError(
                f"model {name!r} is not ready: {st.status}{why}", retry_after=30 if broken else 5
            )
        return served

    def admit(self, name: str, images: int = 1) -> ServedModel:
        served = self.servable(name)
        self.batchers[served.spec.name].admit(images)
        return served

    async def run(self, name: str, payload: Item, deadline: float) -> ImageResult:
        """Run uint8 pixels, normalised floats, or an upload to decode in the worker, through
        ``name``."""
        return await self.result(name, self.enqueue(name, payload, deadline), deadline)

    def enqueue(self, name: str, payload: Item, deadline: float) -> asyncio.Future[ImageResult]:
        batcher = self.batchers.get(name)
        if batcher is None:
            raise ModelNotReadyError(f"model {name!r} is not loaded (unloaded?)", retry_after=5)
        return batcher.submit(payload, deadline)

    async def result(
        self, name: str, queued: asyncio.Future[ImageResult], deadline: float
    ) -> ImageResult:
        remaining = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(queued, max(0.001, remaining))
        except TimeoutError:
            raise TimeoutError(
                f"no result for {name} within IMGCLS_REQUEST_TIMEOUT_S="
                f"{self.settings.request_timeout_s:g}s"
            ) from None

    async def run_explain(
        self,
        name: str,
        pixels: torch.Tensor,
        target: int | None,
        deadline: float,
        slot: GateSlot | None = None,
    ) -> ExplainResult:
        """An explain job in a worker slot booked like a batch's (FIFO with the batchers), so
        explanations and batches share the slot limits, the watchdog and crash handling."""
        if self.pool is None or name not in self.batchers:
            raise ModelNotReadyError(f"model {name!r} is not loaded (unloaded?)", retry_after=5)
        try:
            res = await self.pool.acquire(name, deadline)
        except NoReadyWorkerError as exc:
            raise ModelNotReadyError(str(exc), retry_after=2) from exc
        if res is None:
            raise TimeoutError(f"no worker for {name} came free within the request deadline")
        shared = place_shared(self.pool, res, [pixels], f"the explain job for {name}")
        fut = self.pool.submit_explain(res, name, shared, target)
        return await self.explain_job(name, fut, deadline, slot)


def check_startup(settings: Settings) -> None:
    """What a Service checks as it is made (every IMGCLS_MODELS name in the catalog, the device
    there, the precision possible on it), without starting it: one ValueError, for commands to
    say in one line before a server starts rather than as a traceback from its start-up."""
    try:
        Service(settings)
    except UnknownModelError as exc:
        raise ValueError(f"IMGCLS_MODELS: {exc}") from None
    except RuntimeError as exc:  # a device that is not there
        raise ValueError(str(exc)) from None


def decode_threads(device: str, cores: int, workers: int) -> int | None:
    """Threads a worker decodes uploads on: None for a CPU worker (its own threads); a GPU
    worker's share of the host's cores (a GPU worker runs torch's default of one thread per
    core, and eight GPU workers each decoding on every core held eight images per core at once:
    up to 320 MB each at the pixel limit)."""
    return None if device == "cpu" else max(1, cores // max(1, workers))
