"""The FastAPI side of app/errors.py: every domain error becomes ``{"detail": ...}`` with its
status. Server faults carry the request id in the answer and the traceback in the log."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.catalog import UnknownModelError
from app.engine.batcher import NoWorkerError, QueueFullError
from app.engine.pool import BatchFailedError, ModelUnavailableError, WorkerCrashedError
from app.errors import (
    ElementError,
    ExplainQueueFullError,
    InvalidParameterError,
    ModelNotReadyError,
    ModelNotServedError,
    NotAvailableError,
    UploadError,
    UploadTooLargeError,
    describe,
)
from app.imaging import ImageError, ImageTooLargeError
from app.limits import BodyLimitError
from app.text import clip

log = logging.getLogger("imgcls.errors")

HANDLED: tuple[type[Exception], ...] = (
    ImageError, ImageTooLargeError, UploadError, UploadTooLargeError, UnknownModelError,
    ModelNotServedError, InvalidParameterError, ModelNotReadyError, QueueFullError, NoWorkerError,
    WorkerCrashedError, TimeoutError, BatchFailedError, ElementError, ExplainQueueFullError,
    NotAvailableError, ModelUnavailableError,
)  # fmt: skip


def error_response(request: Request, exc: BaseException) -> JSONResponse:
    failure = describe(exc)
    rid = getattr(request.state, "request_id", None)
    detail = failure.message
    if failure.internal:
        log.error(
            "request %s failed: %s", rid, exc, exc_info=exc,
            extra={"fields": {"request_id": rid, "path": request.url.path}},
        )  # fmt: skip
        detail = f"{failure.message} (request id {rid})"
    headers: dict[str, str] = {}
    if failure.retry_after is not None:
        headers["Retry-After"] = str(failure.retry_after)
    if failure.close:
        headers["Connection"] = "close"
    return JSONResponse({"detail": detail}, status_code=failure.status, headers=headers or None)


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
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": _clip_inputs(jsonable_encoder(exc.errors()))}, 422)

    async def not_routed(request: Request, exc: Exception) -> Response:
        """Starlette's own 404 (no route) and 405 (no such method), in the protocol's form
        under /v2, as every other /v2 answer."""
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        if path == "/v2" or path.startswith("/v2/"):
            said = {
                404: f"no route {clip(path)!r} in the protocol",
                405: f"{request.method} is not allowed on {clip(path)!r}",
            }.get(exc.status_code, str(exc.detail))
            return JSONResponse({"error": said}, exc.status_code, headers=exc.headers)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, not_routed)

    for cls in HANDLED:
        app.add_exception_handler(cls, handler)
    # Anything else: the same generic 500 with the request id, logged with its traceback, from
    # inside the app (the first middleware added is the innermost). Left to Starlette's outer
    # handler, the answer was written and the exception raised on to uvicorn, which closed the
    # connection at once: the client read a reset, not the 500.
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_exception_handler(Exception, handler)  # raised by a middleware: the same answer


# Raised through the app for a middleware outside it to answer: the body limits' 408 and 503
# (app/limits.py), a client gone mid-body (the access log's 499, nothing sent).
PASSED_ON: tuple[type[Exception], ...] = (BodyLimitError, ClientDisconnect)


class UnhandledErrorMiddleware:
    """An exception no handler took becomes the generic 500 answer (``error_response``, which
    logs it with its traceback), and goes no further."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except PASSED_ON:
            raise
        except Exception as exc:
            if started:  # too late for an answer: uvicorn logs it and closes the connection
                raise
            await error_response(Request(scope), exc)(scope, receive, send)
