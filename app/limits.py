"""Connection limits uvicorn does not give, and the budget of upload bytes in flight.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and, with its h11 parser only,
caps header sizes; it has no timeout for receiving headers or a body (issue 16: a silent
connection stayed open, a stalled 19 MB upload held its memory until the client gave up, and
httptools, the parser uvicorn picks, accepted a 32 MB header). Here:

- ``protocol_class``: uvicorn's httptools protocol with a header timeout (the request line and
  headers must arrive within IMGCLS_HEADER_TIMEOUT_S of the connection opening or the previous
  response; else 408, or a silent close if nothing came) and a header size cap
  (IMGCLS_MAX_HEADER_KB; 431 and close).
- ``BodyLimitsMiddleware`` (pure ASGI): the next body bytes must arrive within
  IMGCLS_BODY_TIMEOUT_S and, after that long, at IMGCLS_BODY_MIN_RATE_KB_S on average (408 and
  close: the partial upload is dropped); and a global budget of request-body bytes in flight
  (IMGCLS_MAX_INFLIGHT_MB), reserved from Content-Length before the body is read, or as chunks
  arrive: beyond it, 503 with Retry-After. An ``Expect: 100-continue`` client gets that answer
  before it sends a byte of its body; any answer given before the body was asked for closes the
  connection (the client does not send that body, which the server would otherwise wait for).
- ``server_options``: the uvicorn settings, one place for ``imgcls serve`` and the tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import memory
from app.middleware import accept_id, error_body, large_unread_body

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("imgcls.limits")


# ---- the budget of body bytes in flight -----------------------------------------------------
class InflightBudget:
    """Bytes of request bodies admitted and not yet released (one event loop: no lock)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0

    def reserve(self, n: int) -> bool:
        """Take ``n`` bytes if they fit. A body larger than the whole budget is still admitted
        when nothing else is in flight, so a budget below the upload limit cannot lock out
        every upload."""
        if n <= 0:
            return True
        if self.used and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)

    def refusal(self) -> str:
        """Why a body was refused (503 over HTTP, UNAVAILABLE over gRPC)."""
        return (
            f"the server holds its limit of uploads in flight ({self.limit / 1048576:g} MB, "
            "IMGCLS_MAX_INFLIGHT_MB); retry shortly"
        )


class BodyLimitError(Exception):
    """Raised through ``receive`` by ``BodyLimitsMiddleware``, which answers it (408 or 503):
    a route's catch-all error handler must let it pass (as it does Starlette's
    ``ClientDisconnect``), or it would answer 500 in its place."""


class _BodyTimeout(BodyLimitError):  # not a TimeoutError: that one is the request deadline's 504
    pass


class _OverBudget(BodyLimitError):
    pass


def _closing(start: Message) -> Message:
    """A response start with ``Connection: close`` (unless it has it already)."""
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"connection"]
    return {**start, "headers": [*headers, (b"connection", b"close")]}


async def _send_json(
    send: Send, path: str, status: int, detail: str, headers: dict[str, str]
) -> None:
    body = json.dumps(error_body(path, detail)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def body_timeouts(settings: Settings) -> dict[str, float]:
    """BodyLimitsMiddleware's timeouts from the settings (the service's app and Ray's ingress)."""
    return {
        "body_timeout_s": settings.body_timeout_s,
        "min_rate_bytes_s": settings.body_min_rate_kb_s * 1024,
    }


class BodyLimitsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        budget: InflightBudget,
        max_body: int,
        body_timeout_s: float,
        min_rate_bytes_s: float,
    ) -> None:
        self.app = app
        self.budget = budget
        self.max_body = max_body  # the app refuses larger bodies (413) without reading them
        self.body_timeout_s = body_timeout_s
        self.min_rate = min_rate_bytes_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared_text = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if declared_text is None and not chunked:  # no body
            await self.app(scope, receive, send)
            return
        try:
            declared = int(declared_text) if declared_text is not None else None
        except ValueError:
            declared = None  # the server refuses it before we get here; the app says 400
        reserved = 0
        # A client waiting for "100 Continue" is answered before it sends its body, and the
        # connection closed (its unsent body would otherwise be read as the next request);
        # any other client's body is discarded by uvicorn as it arrives (not held).
        expects = "100-continue" in headers.get("expect", "").lower()
        if declared is not None and 0 < declared <= self.max_body:
            if not self.budget.reserve(declared):
                await self._over_budget(send, scope["path"], close=expects)
                return
            reserved = declared

        received = 0
        finished = False
        started = False
        first_wait: float | None = None
        loop = asyncio.get_running_loop()

        async def guarded_receive() -> Message:
            nonlocal received, finished, reserved, first_wait
            if finished:  # the body is in: later calls wait for a disconnect, unbounded
                return await receive()
            now = loop.time()
            if first_wait is None:
                first_wait = now
            timeout = self.body_timeout_s
            if self.min_rate > 0:  # by then, ``received`` bytes must have taken no longer
                timeout = min(timeout, first_wait + timeout + received / self.min_rate - now)
            try:
                async with asyncio.timeout(max(timeout, 0.001)):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeout(received) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                finished = not message.get("more_body", False)
                if received > reserved and declared is None:  # chunked: reserve as it comes
                    if not self.budget.reserve(received - reserved):
                        raise _OverBudget
                    reserved = received
            return message

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if expects and first_wait is None:
                    # Answered before the body was asked for: the client, still waiting for
                    # "100 Continue", does not send it, and the server would read its next
                    # request as this one's body. Close after this answer instead.
                    message = _closing(message)
                elif not finished and large_unread_body(headers, self.max_body):
                    # refused before its body was read (an unknown model, a full queue, over
                    # a limit): not read to its end and thrown away. A chunked one is, up to
                    # the largest body (protocol_class's drain cap)
                    message = _closing(message)
            await send(message)

        try:
            await self.app(scope, guarded_receive, send_tracking)
        except _BodyTimeout as exc:
            log.info(
                "request body timed out",
                extra={"fields": {"request_id": scope.get("state", {}).get("request_id"),
                                  "received_bytes": exc.args[0]}},
            )  # fmt: skip
            if not started:
                await _send_json(
                    send,
                    scope["path"],
                    408,
                    f"the request body did not arrive in time: each part must come within "
                    f"{self.body_timeout_s:g} s (IMGCLS_BODY_TIMEOUT_S) and the whole at "
                    f"{self.min_rate / 1024:g} KB/s or faster (IMGCLS_BODY_MIN_RATE_KB_S)",
                    {"Connection": "close"},
                )
        except _OverBudget:
            if not started:
                await self._over_budget(send, scope["path"], close=True)
        finally:
            self.budget.release(reserved)
            memory.after_large_buffer(reserved)

    async def _over_budget(self, send: Send, path: str, close: bool) -> None:
        headers = {"Retry-After": "1"}
        if close:
            headers["Connection"] = "close"
        await _send_json(send, path, 503, self.budget.refusal(), headers)


# ---- uvicorn: header timeout and header size cap ---------------------------------------------
def largest_body(settings: Settings) -> int:
    """The largest request body any route takes: an upload's form, or a /v2 infer request."""
    from app.upload import FORM_OVERHEAD

    return max(
        settings.max_upload_bytes + FORM_OVERHEAD, int(settings.oip_max_request_mb * 1024 * 1024)
    )


def protocol_class(
    header_timeout_s: float, max_header_bytes: int, max_drain_bytes: int | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's httptools HTTP/1.1 protocol, plus a header timeout and a header size cap.

    The timer runs from the connection opening, or from the end of the previous exchange (its
    response sent and its body in), to the end of the next request's headers; the same timeout
    bounds the draining of a body the app answered without reading (uvicorn discards it), and
    so does ``max_drain_bytes``: past it the connection is closed (a chunked body, whose size
    no header tells, refused before it was read; 10 GB were read and thrown away at GB/s).
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        timeout_s = header_timeout_s
        max_bytes = max_header_bytes
        max_drain = max_drain_bytes

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._timer: asyncio.TimerHandle | None = None
            self._awaiting = False  # between the end of an exchange and the next headers
            self._in_message = False  # a request's bytes are arriving
            self._raw = 0  # bytes received while the headers were incomplete
            self._parsed = 0  # request line and header bytes the parser handed over
            self._too_large = False
            self._drained = 0  # bytes of a body thrown away after its answer
            # the request's URL and X-Request-ID, as far as they arrived: the form and the id
            # of an answer given here (set again for each request, in ``_await_headers``)
            self._target = b""
            self._sent_id: str | None = None
            super().connection_made(transport)
            self._await_headers()

        def _arm(self) -> None:
            self._cancel_timer()
            self._timer = self.loop.call_later(self.timeout_s, self._on_timeout)

        def _cancel_timer(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _await_headers(self) -> None:
            self._awaiting, self._raw, self._parsed = True, 0, 0
            self._target, self._sent_id = b"", None  # not the previous request's
            self._arm()

        def _on_timeout(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._awaiting and self._raw:  # a request began and stalled: say why
                self._refuse(408, f"request headers took over {self.timeout_s:g} s")
            else:  # nothing sent (uvicorn's keep-alive timer usually comes first), or a body
                self.transport.close()  # being drained too slowly

        def _refuse(self, status: int, detail: str) -> None:
            """Answers here, before the app saw the request, as the app would: the error in
            the route's form (``{"error": ...}`` under /v2), with the request's id."""
            self._awaiting = False
            self._cancel_timer()
            path = self._target.split(b"?", 1)[0].decode("latin-1")
            body = json.dumps(error_body(path, detail)).encode()
            rid = accept_id(self._sent_id).encode()
            phrase = {400: b"Bad Request", 408: b"Request Timeout",
                      431: b"Request Header Fields Too Large"}[status]  # fmt: skip
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"x-request-id: %s\r\nconnection: close\r\n\r\n%s"
                % (status, phrase, len(body), rid, body)
            )
            self.transport.close()

        def _refuse_too_large(self) -> None:
            self._too_large = True
            self._refuse(
                431, f"request line and headers are over {self.max_bytes // 1024} KB "
                "(IMGCLS_MAX_HEADER_KB)"
            )  # fmt: skip

        def data_received(self, data: bytes) -> None:
            if self._too_large or self.transport.is_closing():
                return
            waiting = self._awaiting
            super().data_received(data)
            # Count only data that arrived while headers were awaited and did not complete them.
            # A chunk that ends a body the app answered early (the exchange ends inside it) is
            # the old request's: counting it would take a large body's tail for headers (431).
            if waiting and self._awaiting and not self.transport.is_closing():
                self._raw += len(data)  # the headers are still incomplete after this data
                if self._raw > self.max_bytes:
                    self._refuse_too_large()

        def on_body(self, body: bytes) -> None:
            if self.cycle is not None and self.cycle.response_complete:  # thrown away
                self._drained += len(body)
                if self.max_drain is not None and self._drained > self.max_drain:
                    self.transport.close()  # answered long ago; more than any route takes
                    return
            super().on_body(body)

        def on_message_begin(self) -> None:
            self._in_message = True
            self._target, self._sent_id = b"", None
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._parsed += len(url)
            if len(self._target) <= 64:  # enough to tell /v2 from the rest
                self._target += url[:128]
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._parsed += len(name) + len(value) + 4
            if name.lower() == b"x-request-id":
                self._sent_id = value.decode("latin-1")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._awaiting = False
            self._cancel_timer()
            if self._parsed > self.max_bytes:  # all in one read: stop the parser here
                self._too_large = True  # and send_400_response answers 431
                raise ValueError("request headers too large")
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_message = False
            response_sent = self.cycle is not None and self.cycle.response_complete
            super().on_message_complete()
            if response_sent and not self.transport.is_closing():  # a drained body ended
                self._await_headers()

        def send_400_response(self, msg: str) -> None:
            if self._too_large:
                self._refuse_too_large()
            else:  # uvicorn's answer is plain text, without the request's id
                self._refuse(
                    400, "malformed HTTP request: its request line, a header, or the body's "
                    "framing (Content-Length, chunk sizes) cannot be parsed"
                )  # fmt: skip

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)  # its headers are in already
            super().on_response_complete()
            if pipelined or self.transport.is_closing():
                return
            if self._in_message:  # answered before its body was read: bound the draining
                self._drained = 0
                self._arm()
            else:
                self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._awaiting = False
            self._cancel_timer()
            super().connection_lost(exc)

    return GuardedHttpToolsProtocol


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn keyword arguments (Config or run) for this service's settings."""
    max_header_bytes = settings.max_header_kb * 1024
    http: type[asyncio.Protocol] | str
    try:
        http = protocol_class(settings.header_timeout_s, max_header_bytes, largest_body(settings))
    except ImportError:  # uvicorn without httptools: h11 caps headers, nothing times them
        log.warning("httptools is not installed: no header timeout (IMGCLS_HEADER_TIMEOUT_S)")
        http = "h11"
    return {
        "http": http,
        "timeout_keep_alive": settings.keep_alive_s,
        "h11_max_incomplete_event_size": max_header_bytes,  # if the h11 parser is chosen
        "log_level": settings.log_level.lower(),
        "access_log": False,  # imgcls writes its own JSON line per request
        # seconds as given: uvicorn waits with asyncio.wait_for (int() made 0.9 no grace at all)
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
    }
