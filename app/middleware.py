"""Pure ASGI middleware: request IDs, the optional API key, and HEAD wherever GET is."""

from __future__ import annotations

import asyncio
import hmac
import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def accept_id(sent: str | None) -> str:
    """A request's id: the one the client sent where well formed, else a new one."""
    return sent if sent and VALID_ID.fullmatch(sent) else uuid.uuid4().hex


def error_key(path: str) -> str:
    """An error's JSON key: the Open Inference Protocol's under /v2, the app's elsewhere."""
    return "error" if path.startswith("/v2") else "detail"


def error_body(path: str, message: str) -> dict[str, str]:
    return {error_key(path): message}


def large_unread_body(headers: Headers, max_body: int | None) -> bool:
    """Whether a request answered before its body was read should be closed after the answer:
    its ``Content-Length`` is over what the app takes (``max_body``), which uvicorn would
    otherwise read to its end and throw away (10 GB at a few GB/s, until the header timeout).
    A smaller one, and a chunked one (of unknown size: imgcls's uvicorn protocol stops
    throwing it away past the largest body, limits.protocol_class), are read and thrown away:
    closing on unread bytes makes the kernel reset the connection, and a client still sending
    loses the answer."""
    try:
        declared = int(headers.get("content-length", "0"))
    except ValueError:
        return True
    return max_body is not None and declared > max_body


OPEN_PATHS = {
    "/healthz", "/readyz", "/", "/favicon.ico", "/v2/health/live", "/v2/health/ready",
    "/docs", "/openapi.json",  # the API's documentation, like the page (app/api/docs.py)
}  # fmt: skip


class RequestIdMiddleware:
    """Honours a well-formed ``X-Request-ID``, generates one otherwise, and echoes it back.

    ``echo=False``: behind a proxy that echoes the id itself (Ray Serve's passes the client's
    id, or one of its own, in ``X-Request-ID`` and appends it to the answer): a second header
    would reach the client as ``id, id``."""

    def __init__(self, app: ASGIApp, echo: bool = True) -> None:
        self.app = app
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = accept_id(Headers(scope=scope).get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        if not self.echo:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


class DisconnectMiddleware:
    """Stops a request's work when its client goes away after sending the whole body.

    Starlette runs a handler to its end whatever the client does: an image whose client had
    left was still batched, computed and counted 200 (only a disconnect while the body was
    being read was seen, as ``ClientDisconnect``). Once the body is in, a watcher waits for
    uvicorn's ``http.disconnect``; if it comes before the answer starts, the handler is
    cancelled (its images still queued are dropped, counted "cancelled") and
    ``ClientDisconnect`` raised, which the access log and metrics count as 499. Later calls of
    the app to ``receive`` share the watcher's message.

    A request the server cancels (uvicorn, once its graceful shutdown has waited
    IMGCLS_SHUTDOWN_GRACE_S) is answered 503 with ``Retry-After``, if nothing was sent yet:
    uvicorn's own answer is a plain-text 500, which reads as a fault of the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = asyncio.current_task()
        watcher: asyncio.Task[Message] | None = None
        answered = gone = False

        async def watch() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and not answered and handler is not None:
                gone = True
                handler.cancel()
            return message

        async def receive_watched() -> Message:
            nonlocal watcher
            if watcher is not None:
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.create_task(watch())  # the body is in
            return message

        async def send_watched(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
            await send(message)

        try:
            await self.app(scope, receive_watched, send_watched)
        except asyncio.CancelledError:
            # not this task's cancellation (a cancelled future awaited), or too late to answer
            if handler is None or (not gone and (answered or not handler.cancelling())):
                raise
            handler.uncancel()
            if gone:
                raise ClientDisconnect from None
            # cancelled by the server stopping: its clients may retry elsewhere
            message = "the service is shutting down: retry (another instance, or this one later)"
            stopping = JSONResponse(
                error_body(scope["path"], message), status_code=503,
                headers={"Retry-After": "1", "Connection": "close"},
            )  # fmt: skip
            await stopping(scope, receive, send_watched)
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()


class ApiKeyMiddleware:
    """When IMGCLS_API_KEY is set, every route but health and the page needs the bearer token.

    The scheme is matched in any case (``bearer``, ``BEARER``: RFC 9110 section 11.1), the token
    exactly and in constant time.
    """

    def __init__(self, app: ASGIApp, api_key: str, max_body: int | None = None) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.max_body = max_body  # the largest body the app takes (see large_unread_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or (scope["path"].rstrip("/") or "/") in OPEN_PATHS  # "/healthz/" redirects there
            or scope["path"].startswith("/static/")
        ):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").strip().partition(" ")
        given = token.strip().encode("latin-1")  # the raw header bytes (Starlette decoded them)
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.expected):
            message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
            headers = {"WWW-Authenticate": "Bearer"}
            sent = Headers(scope=scope)
            if "100-continue" in sent.get("expect", "").lower() or large_unread_body(
                sent, self.max_body
            ):
                # the client waits for "100 Continue" and never sends its body: close, or the
                # server reads its next request as that body (limits.BodyLimitsMiddleware);
                # or its body is one the app would refuse anyway
                headers["Connection"] = "close"
            response = JSONResponse(
                error_body(scope["path"], message), status_code=401, headers=headers
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class HeadAsGetMiddleware:
    """HEAD answered wherever GET is (RFC 9110), as GET without its body: FastAPI's routes
    answer the methods they name, so a HEAD on /models or /metrics was 405. The headers are
    GET's, Content-Length included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        inner = {**scope, "method": "GET"}  # uvicorn reads the outer one's HEAD: no body sent
        try:
            await self.app(inner, receive, without_body)
        finally:  # what routing found, for the access log and /metrics outside
            for key in ("route", "path_params", "endpoint"):
                if key in inner:
                    scope[key] = inner[key]
