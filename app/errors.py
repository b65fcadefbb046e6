"""Domain exceptions and the handlers that map them to HTTP status codes.

Every error answer is JSON ``{"detail": "..."}``. Client mistakes get a 4xx, overload and models
that are not ready get 503 with ``Retry-After``, and passed deadlines 504.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.catalog import UnknownModelError
from app.engine.batcher import NoWorkerError, QueueFullError
from app.engine.pool import BatchFailedError, WorkerCrashedError
from app.imaging import ImageError, ImageTooLargeError
from app.text import clip

log = logging.getLogger("imgcls.errors")


class UploadError(ValueError):
    """The request body is not a usable upload (HTTP 400, or ``status`` when given)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UploadTooLargeError(ValueError):
    """The request body is over IMGCLS_MAX_UPLOAD_MB (HTTP 413)."""


class ModelNotServedError(LookupError):
    """The model is in the catalog but this service was not started with it (HTTP 404)."""


class ModelNotReadyError(RuntimeError):
    """The model is loading, restarting, failed, or has no weights (HTTP 503)."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidParameterError(ValueError):
    """A query parameter is well-formed but not acceptable (HTTP 422)."""


def _json(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _clip_inputs(errors: Any) -> Any:
    """FastAPI's validation errors echo the input: cut long strings (a 10 KB model name)."""
    if isinstance(errors, str):
        return clip(errors)
    if isinstance(errors, list):
        return [_clip_inputs(e) for e in errors]
    if isinstance(errors, dict):
        return {k: _clip_inputs(v) for k, v in errors.items()}
    return errors


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _clip_inputs(jsonable_encoder(exc.errors()))}, 422)

    @app.exception_handler(ImageError)
    async def image_error(_: Request, exc: ImageError) -> JSONResponse:
        return _json(400, str(exc))

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return _json(exc.status, str(exc))

    @app.exception_handler(ImageTooLargeError)
    async def image_too_large(_: Request, exc: ImageTooLargeError) -> JSONResponse:
        return _json(413, str(exc))

    @app.exception_handler(UploadTooLargeError)
    async def upload_too_large(_: Request, exc: UploadTooLargeError) -> JSONResponse:
        return _json(413, str(exc), {"Connection": "close"})

    @app.exception_handler(UnknownModelError)
    async def unknown_model(_: Request, exc: UnknownModelError) -> JSONResponse:
        return _json(404, str(exc))

    @app.exception_handler(ModelNotServedError)
    async def not_served(_: Request, exc: ModelNotServedError) -> JSONResponse:
        return _json(404, str(exc))

    @app.exception_handler(InvalidParameterError)
    async def invalid_parameter(_: Request, exc: InvalidParameterError) -> JSONResponse:
        return _json(422, str(exc))

    @app.exception_handler(ModelNotReadyError)
    async def not_ready(_: Request, exc: ModelNotReadyError) -> JSONResponse:
        return _json(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        return _json(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(NoWorkerError)
    async def no_worker(_: Request, exc: NoWorkerError) -> JSONResponse:
        return _json(503, str(exc), {"Retry-After": "2"})

    @app.exception_handler(WorkerCrashedError)
    async def worker_crashed(_: Request, exc: WorkerCrashedError) -> JSONResponse:
        return _json(503, f"{exc}; retry shortly", {"Retry-After": "2"})

    @app.exception_handler(TimeoutError)
    async def deadline(_: Request, exc: TimeoutError) -> JSONResponse:
        return _json(504, f"request deadline passed: {exc}" if str(exc) else "request timed out")

    @app.exception_handler(BatchFailedError)
    async def batch_failed(_: Request, exc: BatchFailedError) -> JSONResponse:
        log.error("batch failed: %s", exc)
        return _json(500, f"inference failed: {exc}")
