"""POST /classify and POST /compare."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.api.deps import (
    ERRORS,
    UPLOAD_BODY,
    RequestIdDep,
    ServiceDep,
    read_encoded,
    read_pixels,
)
from app.engine.batcher import Prediction
from app.responses import classify_result, compare_response, parse_models
from app.schemas import ClassifyResponse, CompareResponse
from app.service import Served

router = APIRouter(tags=["inference"])

TopK = Annotated[int, Query(ge=1, le=20, description="number of predictions (capped at classes)")]


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
    started = time.perf_counter()
    settings = service.settings
    served = service.servable(model or settings.default)  # model checked before the body is read
    spec = served.spec
    if service.decode_in_worker:
        upload = await read_encoded(request, settings)
        deadline = time.monotonic() + settings.request_timeout_s
        pred = await service.predict(spec.name, upload, deadline)
        decode_ms, preprocess_ms = pred.decode_ms or 0.0, pred.preprocess_ms or 0.0
    else:
        pixels = await read_pixels(request, settings, [spec])
        deadline = time.monotonic() + settings.request_timeout_s
        pred = await service.predict(spec.name, pixels.of(spec), deadline)
        decode_ms, preprocess_ms = pixels.decode_ms, pixels.preprocess_ms
    return classify_result(
        spec,
        served.weights_label,
        pred,
        top_k,
        decode_ms=decode_ms,
        preprocess_ms=preprocess_ms,
        started=started,
        request_id=request_id,
    )


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
        Query(max_length=1024, description="2-8 comma-separated names; default: loaded models"),
    ] = None,
    top_k: TopK = 5,
) -> CompareResponse:
    started = time.perf_counter()
    settings = service.settings
    names = parse_models(models, list(service.served))
    served = [service.servable(n) for n in names]
    # Decoded here once, whatever IMGCLS_DECODE says: the models share the pixels.
    pixels = await read_pixels(request, settings, [s.spec for s in served])
    deadline = time.monotonic() + settings.request_timeout_s

    async def timed(s: Served) -> tuple[Prediction, float]:
        pred = await service.predict(s.spec.name, pixels.of(s.spec), deadline)
        return pred, time.perf_counter()

    done = await asyncio.gather(*(timed(s) for s in served))
    preds = [p for p, _ in done]
    results = [
        classify_result(
            s.spec,
            s.weights_label,
            p,
            top_k,
            decode_ms=pixels.decode_ms,
            preprocess_ms=pixels.preprocess_ms,
            started=started,
            finished=finished,  # each model's total ends when its own result arrived
            request_id=request_id,
        )
        for s, (p, finished) in zip(served, done, strict=True)
    ]
    return compare_response(
        [s.spec for s in served],
        preds,
        results,
        top_k,
        decode_ms=pixels.decode_ms,
        started=started,
        request_id=request_id,
    )
