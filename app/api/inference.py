"""POST /classify and POST /compare."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request

from app.agreement import ModelOutput, agreement, top_indices
from app.api.deps import ERRORS, UPLOAD_BODY, RequestIdDep, ServiceDep, read_image
from app.engine.batcher import Prediction
from app.errors import InvalidParameterError
from app.schemas import ClassifyResponse, CompareResponse
from app.service import Served

router = APIRouter(tags=["inference"])

TopK = Annotated[int, Query(ge=1, le=20, description="number of predictions (capped at classes)")]


def _result(
    served: Served,
    pred: Prediction,
    top_k: int,
    *,
    decode_ms: float,
    preprocess_ms: float,
    started: float,
    request_id: str,
    finished: float | None = None,
) -> ClassifyResponse:
    labels = served.spec.labels
    idx = top_indices(pred.probs, top_k)
    return ClassifyResponse.model_validate(
        {
            "model": served.spec.name,
            "weights": served.weights_label or "unknown",
            "device": pred.device,
            "precision": pred.precision,
            "backend": pred.backend,
            "predictions": [
                {"rank": r + 1, "index": int(i), "label": labels[i], "score": float(pred.probs[i])}
                for r, i in enumerate(idx)
            ],
            "latency_ms": {
                "decode": round(decode_ms, 3),
                "preprocess": round(preprocess_ms, 3),
                "queue": round(pred.queue_ms, 3),
                "inference": round(pred.inference_ms, 3),
                "total": round(((finished or time.perf_counter()) - started) * 1000.0, 3),
            },
            "batch_size": pred.batch_size,
            "request_id": request_id,
        }
    )


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
    image, decode_ms = await read_image(request, settings)
    t0 = time.perf_counter()
    tensor = await service.preprocess(served.spec, image)
    preprocess_ms = (time.perf_counter() - t0) * 1000.0
    deadline = time.monotonic() + settings.request_timeout_s
    pred = await service.predict(served.spec.name, tensor, deadline)
    return _result(
        served,
        pred,
        top_k,
        decode_ms=decode_ms,
        preprocess_ms=preprocess_ms,
        started=started,
        request_id=request_id,
    )


def _parse_models(models: str | None, loaded: list[str]) -> list[str]:
    if models is None:
        return loaded[:8]
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not 2 <= len(names) <= 8:
        raise InvalidParameterError(f"'models' must name 2 to 8 models, got {len(names)}")
    if len(set(names)) != len(names):
        raise InvalidParameterError("'models' names a model twice")
    return names


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
    names = _parse_models(models, list(service.served))
    served = [service.servable(n) for n in names]
    image, decode_ms = await read_image(request, settings)

    # Preprocess once per distinct transform, concurrently.
    by_key = {s.spec.transform_key: s.spec for s in served}
    t0 = time.perf_counter()
    tensors = dict(
        zip(
            by_key,
            await asyncio.gather(*(service.preprocess(spec, image) for spec in by_key.values())),
            strict=True,
        )
    )
    preprocess_ms = (time.perf_counter() - t0) * 1000.0
    deadline = time.monotonic() + settings.request_timeout_s

    async def timed(s: Served) -> tuple[Prediction, float]:
        pred = await service.predict(s.spec.name, tensors[s.spec.transform_key], deadline)
        return pred, time.perf_counter()

    done = await asyncio.gather(*(timed(s) for s in served))
    preds = [p for p, _ in done]
    results = [
        _result(
            s,
            p,
            top_k,
            decode_ms=decode_ms,
            preprocess_ms=preprocess_ms,
            started=started,
            finished=finished,  # each model's total ends when its own result arrived
            request_id=request_id,
        )
        for s, (p, finished) in zip(served, done, strict=True)
    ]
    outputs = [
        ModelOutput(
            name=s.spec.name,
            probs=np.asarray(p.probs),
            labels=s.spec.labels,
            label_set=s.spec.label_set_key,
            top_k=min(top_k, s.spec.num_classes),
        )
        for s, p in zip(served, preds, strict=True)
    ]
    return CompareResponse.model_validate(
        {
            "results": [r.model_dump() for r in results],
            "agreement": agreement(outputs),
            "latency_ms": {
                "decode": round(decode_ms, 3),
                "total": round((time.perf_counter() - started) * 1000.0, 3),
            },
            "request_id": request_id,
        }
    )
