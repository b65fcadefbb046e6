"""create_app(): the lifespan starts and stops the worker pool; routers and the page are mounted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import __version__, memory
from app.api import docs, explain, health, inference, models, page
from app.api import errors as api_errors
from app.limits import BodyLimitsMiddleware, InflightBudget, body_timeouts, largest_body
from app.middleware import (
    ApiKeyMiddleware,
    DisconnectMiddleware,
    HeadAsGetMiddleware,
    RequestIdMiddleware,
)
from app.observability import AccessMiddleware, Metrics, configure_logging
from app.oip import codec
from app.oip import rest as oip_rest
from app.service import Service
from app.settings import Settings

DESCRIPTION = """
Classify images with plain CNN (AlexNet, VGG) and residual (ResNet) backbones, and compare them
side by side: top-k predictions, agreement between models, and latency per model.

Upload images as `multipart/form-data` in a field named `file`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    metrics = Metrics()
    service = Service(settings, observer=metrics)  # validates models and custom config first
    metrics.bind(service.snapshot)
    # The budget of request bodies in flight, shared by the HTTP door (BodyLimitsMiddleware) and
    # gRPC's ModelInfer.
    budget = InflightBudget(settings.max_inflight_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # /v2 infer JSON parsed at once (see app/oip/rest.py), on the loop that serves the app
        app.state.oip_parses = asyncio.Semaphore(oip_rest.OIP_PARSES)
        await service.start()
        grpc_server = None
        try:
            if settings.grpc_port:  # imported here: its protobuf names clash with tritonclient's
                from app.oip.grpc_server import start_grpc

                grpc_server = await start_grpc(service, settings, metrics, budget)
            memory.settle()  # see there: no full collection stops the event loop for ~0.2 s
            yield
        finally:
            memory.unsettle()
            if grpc_server is not None:
                await grpc_server.stop(settings.shutdown_grace_s)
            await service.stop()

    app = FastAPI(
        title="imgcls",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by docs.install, without a CDN
        redoc_url=None,
    )
    app.state.service = service
    api_errors.install(app)
    app.include_router(inference.router)
    app.include_router(explain.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(oip_rest.router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    docs.install(app, api_key=bool(settings.api_key))  # its /static/docs before /static
    page.install(app)

    # The last added runs first: request IDs, access log, CORS (answers preflights), client
    # gone (cancels the handler; inside CORS, so that its 503 at shutdown carries CORS's headers
    # and a page on another origin can read it), API key, body limits (timeouts and the budget
    # of uploads in flight). Every body a route may read counts against the budget: uploads (the
    # form around a file) and /v2 infer requests.
    app.state.upload_budget = budget
    max_body = largest_body(settings)
    app.add_middleware(HeadAsGetMiddleware)  # innermost: the others see the request's HEAD
    app.add_middleware(
        BodyLimitsMiddleware, budget=budget, max_body=max_body, **body_timeouts(settings)
    )
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, max_body=max_body)
    app.add_middleware(DisconnectMiddleware)  # a client gone after its body: work stopped, 499
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()],
            allow_methods=["GET", "POST"],
            # /v2's binary tensor data and compressed requests, from a browser too
            allow_headers=[
                "Authorization",
                "Content-Type",
                "X-Request-ID",
                codec.HEADER_LENGTH,
                "Content-Encoding",
            ],
            expose_headers=["X-Request-ID", "Retry-After", codec.HEADER_LENGTH],
        )
    app.add_middleware(
        AccessMiddleware,
        metrics=metrics,
        served=lambda: service.served,
        routes=lambda: oip_rest.router.routes,
        default=settings.default,
    )
    app.add_middleware(RequestIdMiddleware)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` builds the app on first access, configured from IMGCLS_* variables.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
