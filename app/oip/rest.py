"""The Open Inference Protocol over REST: ``/v2/...`` on the service's own port.

Each route converts the request, calls the data plane and converts the answer; every exception a
route raises becomes the protocol's ``{"error": "..."}`` with its status (``OipRoute``), but for a
client gone mid-body and the body limits, which the middlewares answer (499, 408, 503).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from app import memory
from app.errors import UploadTooLargeError
from app.limits import BodyLimitError, InflightBudget
from app.oip import codec
from app.oip.dataplane import DataPlane
from app.oip.failures import ProtocolError, answer
from app.oip.schemas import (
    InferenceResponse,
    LiveResponse,
    LoadResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ModelStatisticsResponse,
    OipError,
    ReadyResponse,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryModelRequest,
    ServerMetadataResponse,
    UnloadResponse,
)
from app.upload import read_body

SMALL_BODY = 64 * 1024  # repository requests: a few parameters at most
# Infer requests whose JSON is larger than codec.PARSE_INLINE_BYTES are parsed on a thread,
# OIP_PARSES at a time (app.state.oip_parses, made in create_app's lifespan).
OIP_PARSES = 2


def error_response(request: Request, exc: BaseException) -> JSONResponse:
    rid = getattr(request.state, "request_id", None) or "-"
    why = answer(exc, rid, request.url.path)
    headers = {"Retry-After": str(why.retry_after)} if why.retry_after is not None else {}
    if why.close:  # the body may not have been read
        headers["Connection"] = "close"
    return JSONResponse({"error": why.message}, status_code=why.status, headers=headers or None)


class OipRoute(APIRoute):
    """Answers exceptions in the protocol's form, ``{"error": ...}``, not the app's ``detail``.

    Its OpenAPI lists every client error in that form ("4XX": the route's own statuses, and
    the 401, 408 and 431 of the guards in front of it), and no 422 (FastAPI's validation errors
    are answered 400 here), plus the 500 of a server fault."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        kwargs["responses"] = {**OTHER_ERRORS, **(kwargs.get("responses") or {})}
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errs = "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5]
                )
                return error_response(request, ProtocolError(errs or "invalid request"))
            except (ClientDisconnect, BodyLimitError):
                raise  # the middlewares answer these: 499 (client gone), 408 or 503 (limits)
            except Exception as exc:
                return error_response(request, exc)

        return route


router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=OipRoute)


async def get_plane(request: Request) -> DataPlane:
    return DataPlane(request.app.state.service)


Plane = Annotated[DataPlane, Depends(get_plane)]
# Catalog names (letters, digits, _ . - and : before a weights variant); no "/", and not "." or
# ".." that URL normalisation would swallow.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}$"
Name = Annotated[
    str, Path(pattern=NAME_PATTERN, description="model name, e.g. resnet50:IMAGENET1K_V1")
]
Version = Annotated[
    str, Path(pattern=NAME_PATTERN, description="model version (every model has 1)")
]
HeaderLength = Annotated[
    str | None,
    Header(
        alias=codec.HEADER_LENGTH,
        description="binary tensor data extension: how many bytes of the body are JSON",
    ),
]


OTHER_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "model": OipError,
        "description": "a client error: those listed, and 401 missing or wrong API key "
        "(IMGCLS_API_KEY), 408 a body that stalls, 431 headers too large",
    },
    500: {"model": OipError, "description": "server fault (the message names the request id)"},
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {
        400: "bad tensors, parameters or body (the message names the element)",
        403: "loading and unloading models is off (IMGCLS_MODEL_CONTROL=none, the default)",
        404: "unknown model or version",
        413: "request, image or image count over the limits",
        415: "unsupported Content-Encoding",
        503: "model not ready or queue full (see Retry-After)",
        504: "request deadline passed",
    }
    return {c: {"model": OipError, "description": what[c]} for c in codes}


def _json_body(model: type[BaseModel], required: bool) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": _inline(model.model_json_schema())}},
        }
    }


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined: OpenAPI tools resolve ``#/$defs``
    against the whole document, not the schema it sits in."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline(codec.InferenceRequestBody.model_json_schema())},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"JSON ({codec.HEADER_LENGTH} bytes), then the inputs' "
                    "binary data in input order",
                }
            },
        },
    }
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": "outputs as JSON, or JSON then binary data (binary_data requested)",
        "content": {codec.BINARY_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    **_errors(400, 404, 413, 415, 503, 504),
}


# ---- server ----------------------------------------------------------------------------------
@router.get("", response_model=ServerMetadataResponse, summary="Server metadata and extensions")
async def server_metadata(plane: Plane) -> ServerMetadataResponse:
    return ServerMetadataResponse(**plane.server_metadata())


@router.get("/health/live", response_model=LiveResponse, summary="The server is alive")
async def server_live(plane: Plane) -> LiveResponse:
    return LiveResponse(live=plane.live())


@router.get(
    "/health/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "some models are not ready"}},
    summary="200 when every model the server was started with is ready",
)
async def server_ready(plane: Plane) -> JSONResponse:
    ready = plane.ready()
    return JSONResponse({"ready": ready}, 200 if ready else 503)


# ---- models ----------------------------------------------------------------------------------
# ---- statistics (Triton's extension; before /models/{name}, which "stats" would match) -------
@router.get(
    "/models/stats",
    response_model=ModelStatisticsResponse,
    summary="Inference statistics of every model the server loads",
)
async def all_statistics(plane: Plane) -> ModelStatisticsResponse:
    return ModelStatisticsResponse.model_validate({"model_stats": plane.statistics()})


@router.get(
    "/models/{name}/stats",
    response_model=ModelStatisticsResponse,
    responses=_errors(400, 404),
    summary="A model's inference statistics (counted per image)",
)
async def model_statistics(name: Name, plane: Plane) -> ModelStatisticsResponse:
    return ModelStatisticsResponse.model_validate({"model_stats": plane.statistics(name)})


@router.get(
    "/models/{name}/versions/{version}/stats",
    response_model=ModelStatisticsResponse,
    responses=_errors(400, 404),
    summary="A model version's inference statistics (every model has version 1)",
)
async def model_version_statistics(
    name: Name, version: Version, plane: Plane
) -> ModelStatisticsResponse:
    stats = plane.statistics(name, version)
    return ModelStatisticsResponse.model_validate({"model_stats": stats})


@router.get(
    "/models/{name}",
    response_model=ModelMetadataResponse,
    responses=_errors(400, 404),
    summary="A model's inputs (IMAGE, PIXELS) and output (PROBABILITIES)",
)
async def model_metadata(name: Name, plane: Plane) -> ModelMetadataResponse:
    return ModelMetadataResponse.model_validate(plane.model_metadata(name), from_attributes=True)


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadataResponse,
    responses=_errors(400, 404),
    summary="A model version's metadata (every model has version 1)",
)
async def model_version_metadata(
    name: Name, version: Version, plane: Plane
) -> ModelMetadataResponse:
    meta = plane.model_metadata(name, version)
    return ModelMetadataResponse.model_validate(meta, from_attributes=True)


READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": ModelReadyResponse, "description": "not ready (or not loaded)"},
    **_errors(400, 404),
}


@router.get(
    "/models/{name}/ready",
    response_model=ModelReadyResponse,
    responses=READY_RESPONSES,
    summary="200 when the model can serve, 503 when not",
)
async def model_ready(name: Name, plane: Plane) -> JSONResponse:
    return _ready(name, plane.model_ready(name))


@router.get(
    "/models/{name}/versions/{version}/ready",
    response_model=ModelReadyResponse,
    responses=READY_RESPONSES,
    summary="200 when the model version can serve, 503 when not",
)
async def model_version_ready(name: Name, version: Version, plane: Plane) -> JSONResponse:
    return _ready(name, plane.model_ready(name, version))


def _ready(name: str, ready: bool) -> JSONResponse:
    return JSONResponse({"name": name, "ready": ready}, 200 if ready else 503)


# ---- inference -------------------------------------------------------------------------------
@router.post(
    "/models/{name}/infer",
    response_class=Response,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_BODY,
    summary="Classify N images (IMAGE files or preprocessed PIXELS)",
)
async def infer(
    name: Name, request: Request, plane: Plane, length: HeaderLength = None
) -> Response:
    return await _infer(plane, request, name, None, length)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_class=Response,
    responses=INFER_RESPONSES,
    openapi_extra=INFER_BODY,
    summary="Classify N images with a model version",
)
async def infer_version(
    name: Name, version: Version, request: Request, plane: Plane, length: HeaderLength = None
) -> Response:
    return await _infer(plane, request, name, version, length)


async def _infer(
    plane: DataPlane, request: Request, name: str, version: str | None, length: str | None
) -> Response:
    plane.check_servable(name, version)  # 404 / 503 before the body is read
    coding = codec.content_coding(request.headers.get("content-encoding"))  # 415 before it too
    limit = int(plane.service.settings.oip_max_request_mb * 1024 * 1024)
    try:
        body = await read_body(request, limit)
    except UploadTooLargeError:
        raise ProtocolError(
            f"the request is over IMGCLS_OIP_MAX_REQUEST_MB ({limit:,} bytes)", 413, close=True
        ) from None
    deadline = plane.service.deadline()  # the parse counts, and so does waiting for it
    if coding is None:
        return await _infer_body(plane, request, name, version, length, body, deadline)
    # Compressed (tritonclient's request_compression_algorithm): decompressed on a thread, as
    # large requests are parsed, bounded by the same limit; the bytes it adds count against
    # IMGCLS_MAX_INFLIGHT_MB beside the compressed body the server already holds.
    inflate = codec.off_the_loop(
        request.app.state.oip_parses, codec.inflate, body, coding, limit,
        "IMGCLS_OIP_MAX_REQUEST_MB",
    )  # fmt: skip
    plain = await plane.service.by_deadline(deadline, inflate, "decompressing the request")
    del body
    budget: InflightBudget = request.app.state.upload_budget
    extra = len(plain)
    if not budget.reserve(extra):
        raise ProtocolError(budget.refusal(), 503, retry_after=1)
    try:
        return await _infer_body(plane, request, name, version, length, plain, deadline)
    finally:
        budget.release(extra)
        del plain
        memory.after_large_buffer(extra)  # the middleware does so for the compressed body only


async def _infer_body(
    plane: DataPlane,
    request: Request,
    name: str,
    version: str | None,
    length: str | None,
    body: bytearray,
    deadline: float,
) -> Response:
    max_batch = plane.service.settings.max_queue
    if codec.json_part_size(body, length) <= codec.PARSE_INLINE_BYTES:
        infer_request = codec.decode_request(body, length, name, version, max_batch)
    else:  # off the event loop, and few at once: parsing JSON takes ~20x its size in memory
        parse = codec.off_the_loop(
            request.app.state.oip_parses, codec.decode_request, body, length, name, version,
            max_batch,
        )  # fmt: skip
        infer_request = await plane.service.by_deadline(deadline, parse, "reading the request")
    answer = await plane.infer(infer_request, deadline)
    content, headers = codec.encode_response(answer)
    return Response(content, headers=headers)


# ---- model repository ------------------------------------------------------------------------
@router.post(
    "/repository/index",
    response_model=list[RepositoryIndexEntry],
    responses=_errors(400, 413),
    openapi_extra=_json_body(RepositoryIndexRequest, required=False),
    summary="Every catalog model with its state (READY, LOADING, UNAVAILABLE)",
)
async def repository_index(request: Request, plane: Plane) -> list[RepositoryIndexEntry]:
    body = await _small_body(request, RepositoryIndexRequest)
    ready_only = body.ready if isinstance(body, RepositoryIndexRequest) else False
    return [RepositoryIndexEntry(**vars(e)) for e in plane.repository_index(ready_only)]


@router.post(
    "/repository/models/{name}/load",
    response_model=LoadResponse,
    responses=_errors(400, 403, 404, 413, 503),
    openapi_extra=_json_body(RepositoryModelRequest, required=False),
    summary="Load a model on the workers; answers once it is ready or has failed",
)
async def repository_load(name: Name, request: Request, plane: Plane) -> LoadResponse:
    await _small_body(request, RepositoryModelRequest)
    await plane.load(name)
    return LoadResponse(name=name, load=True)


@router.post(
    "/repository/models/{name}/unload",
    response_model=UnloadResponse,
    responses=_errors(400, 403, 404, 413, 503),
    openapi_extra=_json_body(RepositoryModelRequest, required=False),
    summary="Drain a model's queue, then free it on the workers",
)
async def repository_unload(name: Name, request: Request, plane: Plane) -> UnloadResponse:
    await _small_body(request, RepositoryModelRequest)
    await plane.unload(name)
    return UnloadResponse(name=name, unload=True)


async def _small_body(request: Request, model: type[BaseModel]) -> BaseModel | None:
    """An optional small JSON body (empty: None), checked against ``model`` (400); sent plain
    (415 for a Content-Encoding: only infer requests may be compressed)."""
    if codec.content_coding(request.headers.get("content-encoding")) is not None:
        raise ProtocolError("only infer requests may be compressed: send this one plain", 415)
    try:
        body = await read_body(request, SMALL_BODY)
    except UploadTooLargeError:
        raise ProtocolError(
            f"the request body is over {SMALL_BODY:,} bytes", 413, close=True
        ) from None
    if not body.strip():
        return None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise ProtocolError(f"invalid request body: {exc.errors()[0]['msg']}") from None
