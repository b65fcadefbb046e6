"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), grpc.aio.

Runs in the service's own process and event loop, on ``IMGCLS_GRPC_PORT``, over the same data
plane as ``/v2``. Each method converts the message, calls the data plane and converts back;
exceptions become gRPC status codes from the same mapping as the REST door's status codes.
When IMGCLS_API_KEY is set, every call but ServerLive/ServerReady needs the metadata
``authorization: Bearer <key>`` (the scheme in any case, as over HTTP). A ModelInfer message
takes its size from the HTTP door's budget of request bodies in flight (IMGCLS_MAX_INFLIGHT_MB)
for the length of the call: beyond it, UNAVAILABLE with ``retry-after``. That budget is taken
once a message has arrived; IMGCLS_GRPC_MAX_CONCURRENT_RPCS bounds the calls (and so the
messages) held at once: beyond it, grpc answers RESOURCE_EXHAUSTED before any handler runs.
A call the client cancels (grpc cancels its handler) is counted as 499, as an HTTP client gone
mid-request is.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Container
from typing import Any, TypeVar

import grpc

from app import memory
from app.limits import InflightBudget
from app.middleware import accept_id
from app.observability import CLIENT_CLOSED, Metrics, access_log
from app.oip import codec
from app.oip import grpc_codec as conv
from app.oip.dataplane import DataPlane
from app.oip.failures import ProtocolError, answer
from app.oip.generated import grpc_predict_v2_pb2 as pb
from app.oip.generated import grpc_predict_v2_pb2_grpc as pb_grpc
from app.service import Service
from app.settings import Settings

log = logging.getLogger("imgcls.oip")

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
OPEN_METHODS = {"ServerLive", "ServerReady"}
_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# the service's own methods, by full path: a refused call is counted under one of these (or
# "unknown"), whatever path a client made up
METHODS = {f"/{_SERVICE.full_name}/{m}": m for m in _SERVICE.methods_by_name}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Method = Callable[["Servicer", Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def request_id(metadata: Any) -> str:
    """A call's request id: the client's ``x-request-id`` metadata where well formed (as over
    HTTP), else a new one."""
    sent = dict(metadata or ()).get("x-request-id")
    if isinstance(sent, bytes):
        sent = sent.decode(errors="replace")
    return accept_id(sent if isinstance(sent, str) else None)


def _answers_errors(method: Method[Req, Resp]) -> Method[Req, Resp]:
    """Any exception becomes the status code its HTTP status maps to, with its message (a server
    fault: INTERNAL, the generic message and the request id). Every answer carries the request
    id as ``x-request-id`` trailing metadata, and the access log's line names it."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        start = time.perf_counter()
        status = 200
        # the models served when it came, and when it ended: a call that unloaded or loaded
        # its model is counted under it (as over HTTP)
        served = set(self.plane.service.served)
        rid = request_id(context.invocation_metadata())
        context.set_trailing_metadata((("x-request-id", rid),))
        try:
            conv.bounded_names(request)
            return await method(self, request, context)
        except asyncio.CancelledError:  # grpc cancels the handler of a call the client left
            status = CLIENT_CLOSED
            raise
        except Exception as exc:
            why = answer(exc, rid, f"/inference.GRPCInferenceService/{method.__name__}")
            status = why.status
            trailing: tuple[tuple[str, str], ...] = (("x-request-id", rid),)
            if why.retry_after is not None:
                trailing += (("retry-after", str(why.retry_after)),)
            code = CODES.get(why.status, grpc.StatusCode.INTERNAL)
            await context.abort(code, why.message, trailing)
            raise  # abort() raises; this line is never reached
        finally:
            served.update(self.plane.service.served)
            elapsed = time.perf_counter() - start
            self.count(method.__name__, request, status, elapsed, rid, served)

    return wrapper


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        plane: DataPlane,
        metrics: Metrics | None = None,
        budget: InflightBudget | None = None,
    ) -> None:
        self.plane = plane
        self.metrics = metrics
        self.budget = budget  # the app's budget of request bodies in flight

    def count(
        self,
        method: str,
        request: Any,
        status: int,
        elapsed: float,
        request_id: str | None = None,
        served: Container[str] | None = None,
    ) -> None:
        """The HTTP door's request metrics and log line, for a call (endpoint ``grpc:Method``,
        the HTTP status its outcome maps to). The model label is the name of a model served
        during the call (``served``; they change with load and unload), else "unknown":
        bounded."""
        name = getattr(request, "model_name", None) or getattr(request, "name", None) or ""
        known = self.plane.service.served if served is None else served
        model = "" if not name else name if name in known else "unknown"
        endpoint = f"grpc:{method}"
        if self.metrics is not None:
            self.metrics.requests.labels(endpoint, model, str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(elapsed)
        if method not in OPEN_METHODS:
            access_log.info(
                "request",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": "gRPC",
                        "path": f"/inference.GRPCInferenceService/{method}",
                        "model": model,
                        "status": status,
                        "latency_ms": round(elapsed * 1000.0, 2),
                    }
                },
            )

    @_answers_errors
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.plane.live())

    @_answers_errors
    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    @_answers_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    @_answers_errors
    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    @_answers_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        return conv.model_metadata(self.plane.model_metadata(request.name, request.version))

    @_answers_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        # grpc has received the whole message by now: the reservation bounds how many such
        # messages are held (and their images decoded) at once, with the HTTP door's bodies.
        size = request.ByteSize()
        if self.budget is not None and not self.budget.reserve(size):
            raise ProtocolError(self.budget.refusal(), 503, retry_after=1)
        # The message is held by this call and, while it reads it, by the conversion thread
        # (which a cancelled call does not stop): the budget is given back when both let go.
        holders = [1]

        def let_go() -> None:
            holders[0] -= 1
            if holders[0] == 0 and self.budget is not None:
                self.budget.release(size)
                memory.after_large_buffer(size)

        deadline = self.plane.service.deadline()
        max_batch = self.plane.service.settings.max_queue
        try:
            if size <= codec.PARSE_INLINE_BYTES:
                infer_request = conv.infer_request(request, max_batch)
            else:  # typed contents are read element by element: off the event loop
                holders[0] += 1
                read = codec.off_the_loop(
                    None, conv.infer_request, request, max_batch, on_done=let_go
                )
                infer_request = await self.plane.service.by_deadline(
                    deadline, read, "reading the request"
                )
            answer = await self.plane.infer(infer_request, deadline)
            return conv.infer_response(answer)
        finally:
            let_go()

    @_answers_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        return conv.repository_index(self.plane.repository_index(request.ready))

    @_answers_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self.plane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_answers_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self.plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @_answers_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        return conv.model_statistics(self.plane.statistics(request.name, request.version))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <key>`` metadata (health calls stay open).
    The scheme is matched in any case (``bearer``, ``BEARER``), the key exactly and in constant
    time, as ``app.middleware.ApiKeyMiddleware`` does over HTTP."""

    def __init__(
        self, api_key: str, refused: Callable[[str, Any, int, float, str], None] | None = None
    ) -> None:
        self.expected = api_key.encode()
        self.deny = grpc.unary_unary_rpc_method_handler(_deny)
        self.refused = refused  # counts and logs a refused call (Servicer.count), as HTTP's 401

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.rsplit("/", 1)[-1] in OPEN_METHODS:
            return await continuation(details)
        start = time.perf_counter()
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.decode(errors="replace") if isinstance(given, bytes) else str(given)
        scheme, _, token = given.strip().partition(" ")
        key = token.strip().encode()
        if scheme.lower() == "bearer" and hmac.compare_digest(key, self.expected):
            return await continuation(details)
        if self.refused is not None:  # before its message is read: no model named
            method = METHODS.get(details.method, "unknown")
            rid = request_id(details.invocation_metadata)
            self.refused(method, None, 401, time.perf_counter() - start, rid)
        return self.deny


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or wrong API key: send the metadata 'authorization: Bearer <key>'",
    )


async def start_grpc(
    service: Service,
    settings: Settings,
    metrics: Metrics | None = None,
    budget: InflightBudget | None = None,
) -> grpc.aio.Server:
    """Listen on IMGCLS_GRPC_HOST:IMGCLS_GRPC_PORT in the running event loop; calls are counted
    in ``metrics`` (the app's) like HTTP requests, and ModelInfer messages take their size from
    ``budget`` (the app's, in the same event loop) while they are served."""
    limit = int(settings.oip_max_request_mb * 1024 * 1024)
    servicer = Servicer(DataPlane(service), metrics, budget)
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(settings.api_key, servicer.count)]
        if settings.api_key
        else [],
        options=[
            ("grpc.max_receive_message_length", limit),
            # no cap on answers: a request within the limit can ask for more bytes back (4 KB a
            # ImageNet image of probabilities), computed before the cap refused to send them
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port already in use is an error, not a shared port
        ],
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot listen for gRPC on {address} ({exc}); set IMGCLS_GRPC_PORT to a free port, "
            f"or 0 to turn gRPC off"
        ) from None
    await server.start()
    log.info("Open Inference Protocol gRPC on %s", address)
    return server
