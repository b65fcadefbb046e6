"""The running service: catalog, weights, worker pool and one batcher per model.

Routes call ``classify``/``compare``-level helpers here; nothing in this module knows about HTTP
except the domain errors it raises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from app import weights as weights_mod
from app.catalog import Catalog, ModelSpec
from app.catalog.custom import catalog_for
from app.engine import fastpath
from app.engine.batcher import ModelBatcher, Prediction
from app.engine.decoding import Item
from app.engine.pool import ModelStatus, WorkerPool, resolve_devices
from app.engine.worker import WorkerConfig
from app.errors import ModelNotReadyError, ModelNotServedError
from app.observability import Metrics
from app.settings import Settings

log = logging.getLogger("imgcls.service")


@dataclass
class Served:
    """A model this service was started with, and what stops it from serving if anything."""

    spec: ModelSpec
    weights_label: str | None = None  # the enum name, the file, or "random"
    problem: str | None = None  # "missing-weights" | "failed"
    reason: str | None = None


class Service:
    def __init__(
        self, settings: Settings, catalog: Catalog | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.catalog = catalog or catalog_for(settings.model_config_file)
        self.served: dict[str, Served] = {}
        for name in settings.model_names:
            self.served[name] = Served(self.catalog.get(name))  # unknown names stop startup
        self.devices = resolve_devices(settings.device)
        self.paths = {  # raises for impossible combinations (fp16 on a CPU) before serving
            d: fastpath.resolve(settings.precision, settings.channels_last, settings.compile, d)
            for d in self.devices
        }
        self.decode_in_worker = settings.decode == "worker"
        self.pool: WorkerPool | None = None
        self.batchers: dict[str, ModelBatcher] = {}
        self.started = time.monotonic()
        self._startup: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        torch.set_num_threads(1)  # the API process only preprocesses; workers own the cores
        self._startup = asyncio.create_task(self._load())

    async def _load(self) -> None:
        plans = []
        for name, served in self.served.items():
            try:
                path = await asyncio.to_thread(
                    weights_mod.resolve,
                    served.spec,
                    self.settings.weights_dir,
                    auto_download=self.settings.auto_download,
                    allow_random=self.settings.allow_random_weights,
                    mirror=self.settings.weights_mirror,
                )
            except weights_mod.WeightsError as exc:
                served.problem, served.reason = "missing-weights", str(exc)
                log.error("%s", exc)
                continue
            if path is None:
                served.weights_label = "random"
                log.warning("%s serves RANDOM weights (IMGCLS_ALLOW_RANDOM_WEIGHTS)", name)
            elif served.spec.source == "torchvision":
                served.weights_label = served.spec.weights_name
            else:
                served.weights_label = path.name
            plans.append(served.spec.load_plan(str(path) if path else None))
        configs: list[WorkerConfig] = []
        per_device = self.settings.workers_per_device
        cpu_workers = sum(per_device for d in self.devices if d == "cpu")
        threads = self.settings.threads_per_worker or max(
            1, (os.cpu_count() or 1) // max(1, cpu_workers)
        )
        for device in self.devices:
            fast = self.paths[device]
            for _ in range(per_device):
                configs.append(
                    WorkerConfig(
                        worker_id=len(configs),
                        device=device,
                        precision=fast.precision,
                        channels_last=fast.channels_last,
                        compile=fast.compile,
                        threads=threads if device == "cpu" else None,
                        warmup_batch=self.settings.max_batch_size,
                        plans=plans,
                        max_pixels=self.settings.max_pixels,
                        jpeg_on_device=device.startswith("cuda"),
                    )
                )
        self.pool = WorkerPool(configs)
        await self.pool.start()
        for plan in plans:
            b = ModelBatcher(
                plan.name,
                self.pool,
                max_batch_size=self.settings.max_batch_size,
                max_wait_s=self.settings.max_batch_wait_ms / 1000.0,
                max_queue=self.settings.max_queue,
                metrics=self.metrics,
            )
            b.start()
            self.batchers[plan.name] = b

    async def stop(self) -> None:
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            await asyncio.gather(self._startup, return_exceptions=True)
        for b in self.batchers.values():
            await b.stop()
        if self.pool is not None:
            await self.pool.close(grace_s=self.settings.shutdown_grace_s)

    # ---- status ----------------------------------------------------------------------------
    def status(self, name: str) -> ModelStatus:
        """The status of any catalog model in this service."""
        served = self.served.get(name)
        if served is None:
            return ModelStatus("not-loaded", "not in IMGCLS_MODELS")
        if served.problem:
            return ModelStatus(served.problem, served.reason)
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
        )
        if labels:
            entry["labels"] = list(spec.labels)
        return entry

    def model_entries(self) -> list[dict[str, Any]]:
        names = dict.fromkeys([*self.catalog.names(), *self.served])
        return [self.model_entry(n, labels=False) for n in names]

    # ---- inference -------------------------------------------------------------------------
    def servable(self, name: str) -> Served:
        """The served model called ``name``, or the error that says why it cannot run."""
        served = self.served.get(name)
        if served is None:
            spec = self.catalog.get(name)  # raises UnknownModelError for names not in the catalog
            raise ModelNotServedError(
                f"model {spec.name!r} is in the catalog but not loaded by this service; "
                f"loaded models: {', '.join(self.served)} (add it to IMGCLS_MODELS)"
            )
        st = self.status(name)
        status, reason = st.status, st.reason
        if status != "ready":
            raise ModelNotReadyError(
                f"model {name!r} is not ready: {status}" + (f" ({reason})" if reason else ""),
                retry_after=30 if status in ("missing-weights", "failed") else 5,
            )
        return served

    async def predict(self, name: str, payload: Item, deadline: float) -> Prediction:
        """Run uint8 pixels, or an upload to decode in the worker, through ``name``."""
        batcher = self.batchers[name]
        fut = batcher.submit(payload, deadline)
        remaining = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(fut, max(0.001, remaining))
        except TimeoutError:
            raise TimeoutError(
                f"no result for {name} within IMGCLS_REQUEST_TIMEOUT_S="
                f"{self.settings.request_timeout_s:g}s"
            ) from None
