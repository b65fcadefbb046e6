"""POST /classify and POST /compare: read the request, call the core (app/core.py), answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.api.deps import ERRORS, MAX_TOP_K, UPLOAD_BODY, RequestIdDep, ServiceDep
from app.core import parse_models
from app.schemas import ClassifyResponse, CompareResponse
from app.upload import read_upload

router = APIRouter(tags=["inference"])

TopK = Annotated[
    int, Query(ge=1, le=MAX_TOP_K, description="number of predictions (capped at classes)")
]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    summary="Classify one image with one backbone",
)
async def classify(
    request: Request,
    service: ServiceDep,
    request_id: RequestIdDep,
    model: Annotated[
        str | None, Query(max_length=128, description="backbone name; default IMGCLS_DEFAULT_MODEL")
    ] = None,
    top_k: TopK = 5,
) -> ClassifyResponse:
    name = (model or "").strip() or service.default_model  # as /compare reads its names
    service.admit(name)  # model and queue room checked before the body is read
    upload = await read_upload(request, service.settings.max_upload_bytes)
    return await service.classify(upload.data, name, top_k, request_id, upload.received)


@router.post(
    "/compare",
    response_model=CompareResponse,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
    summary="Run one image through several backbones and measure their agreement",
)
async def compare(
    request: Request,
    service: ServiceDep,
    request_id: RequestIdDep,
    models: Annotated[
        str | None,
        Query(
            max_length=1024,
            description="2-8 comma-separated names; default: the ready models (at most 8)",
        ),
    ] = None,
    top_k: TopK = 5,
    explain: Annotated[
        str | None,
        Query(
            max_length=32,
            description="gradcam: add each model's Grad-CAM overlay for its top-1, and the "
            "heatmaps' pairwise similarity to the agreement",
        ),
    ] = None,
) -> CompareResponse:
    names = parse_models(models, service.ready_models())
    for name in names:
        service.admit(name)
    if explain is not None:
        service.explain_gate.check(len(names))  # first: more than it can ever hold is a 422
        for name in names:
            service.admit_explain(name, explain)
    upload = await read_upload(request, service.settings.max_upload_bytes)
    return await service.compare(
        upload.data, models, top_k, request_id, explain=explain, received=upload.received
    )
