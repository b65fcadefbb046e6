"""Prometheus metrics (official client) and one JSON log line per request."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.text import clip

if TYPE_CHECKING:
    from app.engine.pool import WorkerSnapshot
    from app.service import ServiceSnapshot

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ENDPOINTS = {
    "/classify",
    "/compare",
    "/explain",
    "/models",
    "/healthz",
    "/readyz",
    "/info",
    "/metrics",
    "/",
}


class Metrics:
    """One registry per app, so several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imgcls_requests", "HTTP requests by endpoint, model and status",
            ["endpoint", "model", "status"], registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "imgcls_request_latency_seconds", "Request latency, received to response ready",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_latency = Histogram(
            "imgcls_queue_latency_seconds", "Time an image waited for its batch and a worker",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_latency = Histogram(
            "imgcls_inference_latency_seconds", "Forward pass of the batch an image ran in",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "imgcls_batch_size", "Images per batch run", ["model"], buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "imgcls_dropped_images", "Images dropped before inference (deadline or client gone)",
            ["model", "reason"], registry=r,
        )  # fmt: skip

    # EngineObserver: what the batchers report
    def batch_ran(self, model: str, images: int, inference_s: float, waits_s: list[float]) -> None:
        self.batch_size.labels(model).observe(images)  # images computed
        self.inference_latency.labels(model).observe(inference_s)
        for wait in waits_s:
            self.queue_latency.labels(model).observe(wait)

    def image_dropped(self, model: str, reason: str) -> None:
        self.dropped.labels(model, reason).inc()

    def bind(self, snapshot: Callable[[], ServiceSnapshot]) -> None:
        self.registry.register(_ServiceCollector(snapshot))


class _ServiceCollector(Collector):
    """Values read at scrape time, from the service's snapshot: queue depth, models by status,
    workers, restarts (crash or watchdog), device memory."""

    def __init__(self, snapshot: Callable[[], ServiceSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snap = self.snapshot()
        depth = GaugeMetricFamily(
            "imgcls_queue_depth", "Images waiting per model", labels=["model"]
        )
        for name, n in snap.queue_depths.items():
            depth.add_metric([name], n)
        yield depth
        models = GaugeMetricFamily(
            "imgcls_models", "Configured models by status", labels=["status"]
        )
        for st in ("ready", "loading", "missing-weights", "failed"):
            models.add_metric([st], snap.model_counts.get(st, 0))
        yield models
        workers = GaugeMetricFamily(
            "imgcls_workers_alive", "Worker processes alive", labels=["device"]
        )
        restarts = GaugeMetricFamily(
            "imgcls_worker_restarts",
            "Worker restarts since start, by reason: crash (the process died) or watchdog (hung)",
            labels=["device", "reason"],
        )
        memory = GaugeMetricFamily(
            "imgcls_device_memory_bytes",
            "Memory in use per device: CUDA memory allocated by the workers, or their RSS on CPU",
            labels=["device"],
        )
        by_device: dict[str, list[WorkerSnapshot]] = {}
        for w in snap.workers:
            by_device.setdefault(w.device, []).append(w)
        for device, ws in by_device.items():
            workers.add_metric([device], sum(w.alive for w in ws))
            for reason in ("crash", "watchdog"):
                restarts.add_metric([device, reason], sum(w.restarts.get(reason, 0) for w in ws))
            if device == "cpu":
                used = sum(_rss(w.pid) for w in ws if w.alive and w.pid)
            else:
                used = sum(w.device_memory for w in ws if w.alive)
            memory.add_metric([device], used)
        yield workers
        yield restarts
        yield memory


def _rss(pid: int) -> int:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            doc.update(extra)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """imgcls loggers write JSON lines (or plain text) to stderr, and so does the rest of what
    the process logs through Python's logging: other libraries' warnings and errors (the root
    logger, unless the host process configured it; Python's ``warnings`` through it), and the
    lines of uvicorn's and torch's own handlers, so that a log pipeline can parse each line."""
    formatter = (
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    logger = logging.getLogger("imgcls")
    logger.setLevel(level.upper())
    _handler(logger, logging.NOTSET, formatter)
    logger.propagate = False
    root = logging.getLogger()
    if all(getattr(h, "_imgcls", False) for h in root.handlers):  # not configured by the host
        _handler(root, logging.WARNING, formatter)
    logging.captureWarnings(True)
    # uvicorn's and torch's own handlers (plain text), on loggers that do not propagate:
    # torch puts one on each of its registered loggers (torch._dynamo, torch._inductor, ...)
    for name, known in list(logging.root.manager.loggerDict.items()):
        if isinstance(known, logging.Logger) and name.split(".")[0] in ("uvicorn", "torch"):
            for h in known.handlers:
                h.setFormatter(formatter)


class _Stderr(logging.StreamHandler):
    """A handler on ``sys.stderr`` as it is at each record (as logging's last resort), not as
    it was when the first app was made: tests and embedding processes replace it."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        logging.Handler.__init__(self, level)

    @property
    def stream(self) -> Any:
        return sys.stderr


def _handler(logger: logging.Logger, level: int, formatter: logging.Formatter) -> None:
    """imgcls's stderr handler on ``logger`` (added once), with ``formatter``."""
    ours = [h for h in logger.handlers if getattr(h, "_imgcls", False)]
    if not ours:
        handler = _Stderr(level)
        handler._imgcls = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        ours = [handler]
    for h in ours:
        h.setFormatter(formatter)


access_log = logging.getLogger("imgcls.access")


# nginx's code for "the client closed the connection before the answer": not a server error,
# so error-rate alerts on 5xx do not fire on clients' network trouble.
CLIENT_CLOSED = 499


class AccessMiddleware:
    """Counts and times every request, and logs it as one JSON line.

    A client that goes away mid-request (Starlette raises ``ClientDisconnect`` when the body
    read meets the disconnect) is logged at info as "client disconnected" with its request id,
    no traceback, and counted under status 499.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        served: Callable[[], Iterable[str]],
        routes: Callable[[], Sequence[BaseRoute]] = list,
        default: str = "",
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.served = served  # the models served now (they change with load and unload)
        self.routes = routes  # /v2's, for requests answered before routing (a 401)
        self.default = default  # the model of a /classify or /explain that names none

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        # the models served when it came, and (below) when it ended: a request that unloaded
        # or loaded its model, or was answered while another request did, is counted under it
        served_at_start = set(self.served())

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except ClientDisconnect:
            status = CLIENT_CLOSED  # nobody to answer: swallowed, uvicorn sends nothing
        finally:
            elapsed = time.perf_counter() - start
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "other"
            if path.startswith("/models/"):
                endpoint = "/models/{name}"
            served = served_at_start.union(self.served())
            model = _model_label(scope, served, self.default)
            if path.startswith("/v2"):  # the route's template, not the path: bounded labels
                endpoint, params = _route(scope, self.routes)
                name = params.get("name")
                model = "" if name is None else name if name in served else "unknown"
            self.metrics.requests.labels(endpoint, model, str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(elapsed)
            if endpoint not in ("/metrics", "/healthz", "/readyz") or status == CLIENT_CLOSED:
                access_log.info(
                    "client disconnected" if status == CLIENT_CLOSED else "request",
                    extra={
                        "fields": {
                            "request_id": scope.get("state", {}).get("request_id"),
                            "method": scope["method"],
                            "path": clip(path),
                            "model": model,
                            "status": status,
                            "latency_ms": round(elapsed * 1000.0, 2),
                        }
                    },
                )


def _route(scope: Scope, routes: Callable[[], Sequence[BaseRoute]]) -> tuple[str, dict[str, Any]]:
    """The template and path parameters of the route that served the request; for one answered
    before routing (the API key's 401), of the route among ``routes`` whose path it matches;
    else "other"."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", "other"), scope.get("path_params", {})
    for candidate in routes():  # only for a request no route has seen
        regex = getattr(candidate, "path_regex", None)
        found = regex.match(scope["path"]) if regex is not None else None
        if found is not None:
            return getattr(candidate, "path", "other"), found.groupdict()
    return "other", {}


def _model_label(scope: Scope, served: Container[str], default: str = "") -> str:
    """The model a request names, if it is one this service serves (bounded cardinality): in
    the path for /models/{name}, in the query for the routes that take ``model``, read as the
    route reads it (the last one, spaces around it dropped; none or blank: ``default``)."""
    from urllib.parse import parse_qs

    path = scope["path"]
    if path == "/compare":
        return "multiple"
    if path.startswith("/models/"):
        name = path.removeprefix("/models/")  # the path is decoded already
    elif path in ("/classify", "/explain"):
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        name = query.get("model", [""])[-1].strip() or default
    else:
        return ""
    return name if name in served else "unknown"
