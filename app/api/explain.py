"""POST /explain: where one backbone looked in an image (Grad-CAM), through the core."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.api.deps import ERRORS, UPLOAD_BODY, RequestIdDep, ServiceDep
from app.schemas import ErrorMessage, ExplainResponse, InvalidRequest
from app.upload import read_upload

router = APIRouter(tags=["explain"])

EXPLAIN_ERRORS = {
    **ERRORS,
    422: {
        "model": InvalidRequest,
        "description": "unknown method, target not a class of the model, or missing 'file'",
    },
    501: {"model": ErrorMessage, "description": "explanations are not available on this backend"},
    503: {
        "model": ErrorMessage,
        "description": "model not ready, the explanation queue full, its checkpoint replaced "
        "since load, or the server stopping (see Retry-After)",
    },
}


@router.post(
    "/explain",
    response_model=ExplainResponse,
    response_model_exclude_none=True,
    responses=EXPLAIN_ERRORS,
    openapi_extra=UPLOAD_BODY,
    summary="Where one backbone looks in an image (Grad-CAM heatmap and overlay)",
)
async def explain(
    request: Request,
    service: ServiceDep,
    request_id: RequestIdDep,
    model: Annotated[
        str | None, Query(max_length=128, description="backbone name; default IMGCLS_DEFAULT_MODEL")
    ] = None,
    method: Annotated[
        str, Query(max_length=32, description="explanation method: gradcam")
    ] = "gradcam",
    target: Annotated[
        str,
        Query(max_length=16, description="top1 (the model's answer) or a class index to explain"),
    ] = "top1",
    heatmap: Annotated[
        bool, Query(description="include the heatmap values (false: only the overlay picture)")
    ] = True,
) -> ExplainResponse:
    name = (model or "").strip() or service.default_model  # as /compare reads its names
    # method, target, model and the explanation queue checked before the body is read
    service.admit_explain(name, method, target)
    upload = await read_upload(request, service.settings.max_upload_bytes)
    return await service.explain(
        upload.data, name, method, target, heatmap, request_id, received=upload.received
    )
