"""Building the public responses from engine results (used by app/core.py for every front-end)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from app.agreement import ModelOutput, agreement, top_indices
from app.catalog import ModelSpec
from app.engine.batcher import ImageResult
from app.engine.explain import data_url
from app.engine.pool import ExplainResult
from app.schemas import ClassifyResponse, CompareResponse, ExplainResponse


def classify_result(
    spec: ModelSpec,
    weights_label: str | None,
    pred: ImageResult,
    top_k: int,
    *,
    decode_ms: float,
    preprocess_ms: float,
    started: float,
    request_id: str,
    finished: float | None = None,
) -> ClassifyResponse:
    """One model's answer; ``total`` runs from ``started`` to ``finished`` (perf_counter)."""
    idx = top_indices(pred.probs, top_k)
    return ClassifyResponse.model_validate(
        {
            "model": spec.name,
            "weights": weights_label or "unknown",
            "device": pred.device,
            "precision": pred.precision,
            "backend": pred.backend,
            "predictions": [
                {
                    "rank": r + 1,
                    "index": int(i),
                    "label": spec.labels[i],
                    "score": float(pred.probs[i]),
                }
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


def compare_response(
    specs: Sequence[ModelSpec],
    preds: Sequence[ImageResult],
    results: Sequence[ClassifyResponse],
    top_k: int,
    *,
    decode_ms: float,
    started: float,
    request_id: str,
) -> CompareResponse:
    outputs = [
        ModelOutput(
            name=spec.name,
            probs=np.asarray(p.probs),
            labels=spec.labels,
            label_set=spec.label_set_key,
            top_k=min(top_k, spec.num_classes),
        )
        for spec, p in zip(specs, preds, strict=True)
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


def explain_result(
    spec: ModelSpec,
    method: str,
    result: ExplainResult,
    *,
    heatmap: bool,
    decode_ms: float,
    preprocess_ms: float,
    queue_ms: float,
    started: float,
    request_id: str,
) -> ExplainResponse:
    """One model's explanation of one image (row 0 of ``result``)."""
    index = int(result.targets[0])
    heat = np.asarray(result.heatmaps[0], dtype=np.float32)
    return ExplainResponse.model_validate(
        {
            "model": spec.name,
            "method": method,
            "target": {
                "index": index,
                "label": spec.labels[index],
                "score": float(result.scores[0]),
            },
            "heatmap": (
                {
                    "height": int(heat.shape[0]),
                    "width": int(heat.shape[1]),
                    # in float64: float32's 0.037 is 0.03700000047683716 in JSON (3x the bytes)
                    "values": np.round(heat.astype(np.float64), 3).tolist(),
                }
                if heatmap
                else None
            ),
            "overlay": data_url(result.overlays[0]),
            "latency_ms": {
                "decode": round(decode_ms, 3),
                "preprocess": round(preprocess_ms, 3),
                "queue": round(queue_ms, 3),
                "explain": round(result.explain_ms, 3),
                "total": round((time.perf_counter() - started) * 1000.0, 3),
            },
            "request_id": request_id,
        }
    )
