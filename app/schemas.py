"""Pydantic models of the public HTTP contract."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorMessage(BaseModel):
    """Every error of the app's own routes (under /v2, the protocol's ``{"error": ...}``)."""

    detail: str = Field(
        description="what went wrong and what to do about it; a server fault's names the "
        "request id its log entry carries"
    )


class InvalidRequest(BaseModel):
    """422: a parameter the route checks itself (a message), or FastAPI's field errors."""

    detail: str | list[dict[str, Any]] = Field(
        description="a message, or one entry per invalid field (loc, msg, type, input)"
    )


class ClassScore(BaseModel):
    rank: int = Field(description="1 for the most probable class")
    index: int = Field(description="class index in the model's label list")
    label: str
    score: float = Field(description="softmax probability")


class Latency(BaseModel):
    decode: float = Field(description="bytes to RGB image, ms")
    preprocess: float = Field(description="resize, crop and normalise, ms")
    queue: float = Field(description="waiting for a batch and a worker, ms")
    inference: float = Field(description="forward pass of the batch this image ran in, ms")
    total: float = Field(
        description="upload received in full to response ready, ms (its transfer not counted)"
    )


class ExplainTarget(BaseModel):
    index: int = Field(description="the class the map explains")
    label: str
    score: float = Field(description="softmax probability of that class (fp32 model)")


class Heatmap(BaseModel):
    height: int
    width: int
    values: list[list[float]] = Field(
        description="rows of the Grad-CAM map in [0, 1] (3 decimals), on the pixels the model saw"
    )


class ExplainLatency(BaseModel):
    decode: float = Field(description="bytes to RGB image, ms")
    preprocess: float = Field(description="resize and crop, ms")
    queue: float = Field(description="waiting for an explanation slot and a worker, ms")
    explain: float = Field(description="forward and backward pass and overlay in the worker, ms")
    total: float = Field(
        description="upload received in full to response ready, ms (its transfer not counted)"
    )


class ExplainResponse(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "resnet50",
                    "method": "gradcam",
                    "target": {"index": 285, "label": "Egyptian cat", "score": 0.71},
                    "heatmap": {"height": 2, "width": 2, "values": [[0.0, 0.25], [0.5, 1.0]]},
                    "overlay": "data:image/png;base64,iVBORw0KGgo...",
                    "latency_ms": {
                        "decode": 3.1,
                        "preprocess": 4.2,
                        "queue": 0.8,
                        "explain": 160.0,
                        "total": 171.4,
                    },
                    "request_id": "5f0c6a2e4d1b4f0e9a8b7c6d5e4f3a2b",
                }
            ]
        },
    )

    model: str
    method: Literal["gradcam"]
    target: ExplainTarget
    heatmap: Heatmap | None = Field(None, description="omitted with heatmap=false")
    overlay: str = Field(description="data:image/png;base64 URL: the model's input, map blended on")
    latency_ms: ExplainLatency
    request_id: str


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "resnet50",
                    "weights": "IMAGENET1K_V2",
                    "device": "cpu",
                    "precision": "bf16",
                    "backend": "inductor",
                    "predictions": [
                        {"rank": 1, "index": 285, "label": "Egyptian cat", "score": 0.71},
                        {"rank": 2, "index": 281, "label": "tabby", "score": 0.12},
                    ],
                    "latency_ms": {
                        "decode": 3.1,
                        "preprocess": 4.2,
                        "queue": 1.7,
                        "inference": 38.0,
                        "total": 49.5,
                    },
                    "batch_size": 4,
                    "request_id": "5f0c6a2e4d1b4f0e9a8b7c6d5e4f3a2b",
                }
            ]
        },
    )

    model: str
    weights: str = Field(description='weights enum name, checkpoint file, or "random"')
    device: str
    precision: str = Field(description="numeric precision the model ran in: fp32, bf16 or fp16")
    backend: str = Field(
        description="eager, inductor (torch.compile), or openvino (IMGCLS_CPU_RUNTIME)"
    )
    predictions: list[ClassScore]
    latency_ms: Latency
    batch_size: int = Field(description="size of the batch this image actually ran in")
    request_id: str
    explanation: ExplainResponse | None = Field(
        None, description="/compare with explain=gradcam: where the model looked for its top-1"
    )


class Consensus(BaseModel):
    label: str
    index: int
    votes: int
    of: int


class Pairwise(BaseModel):
    a: str
    b: str
    top1_same: bool
    topk_overlap: float = Field(description="Jaccard index of the two top-k index sets")
    js_divergence: float = Field(description="Jensen-Shannon divergence (bits) of full outputs")


class HeatmapSimilarity(BaseModel):
    a: str
    b: str
    pearson: float = Field(description="Pearson correlation of the two Grad-CAM maps, -1..1")


class Agreement(BaseModel):
    top1_consensus: Consensus | None
    pairwise: list[Pairwise]
    heatmap_similarity: list[HeatmapSimilarity] | None = Field(
        None, description="explain=gradcam: pairs of models that see the same pixels (geometry)"
    )


class CompareLatency(BaseModel):
    decode: float
    total: float


class CompareResponse(BaseModel):
    results: list[ClassifyResponse]
    agreement: Agreement
    latency_ms: CompareLatency
    request_id: str


class JpegDecodePick(BaseModel):
    decoder: str = Field(
        description="nvjpeg (CUDA), torchvision (CPU: libjpeg-turbo on the worker's threads) or "
        "pillow (on the worker's threads, with draft decoding where it is on)"
    )
    ms_per_image: dict[str, float] = Field(description="decode and resize, each decoder")
    refused: str | None = Field(
        None, description="why the tensor decoder lost this size whatever its time"
    )


class ModelEntry(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    arch: str
    family: Literal["cnn", "resnet"]
    depth: int
    source: str
    params: int | None
    gflops: float | None
    acc1: float | None
    acc5: float | None
    weights_name: str | None
    weights_file: str | None
    input_size: int
    num_classes: int
    status: Literal["ready", "loading", "missing-weights", "failed", "not-loaded"]
    reason: str | None
    device: str | None
    weights: str | None
    precision: str | None
    backend: str | None
    batch_size: int | None = Field(
        None, description="largest batch it runs in (measured with IMGCLS_MAX_BATCH_SIZE=auto)"
    )
    jpeg_decode: dict[str, JpegDecodePick] | None = Field(
        None,
        description="per upload size (WxH), the JPEG decoder its workers timed faster at load "
        "(nvjpeg on CUDA, torchvision on the CPU, or Pillow) and both times; a plain JPEG goes "
        "to the pick for the nearest size. null: Pillow decodes every upload (on the CPU, the "
        "tensor decoder takes only sizes where it gives Pillow's pixels)",
    )


class ModelDetail(ModelEntry):
    labels: list[str]


class ModelsResponse(BaseModel):
    models: list[ModelEntry]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    not_ready: list[str] = []


class Info(BaseModel):
    version: str
    default_model: str
    models: list[str] = Field(description="models this service was started with")
    max_upload_mb: float
    max_pixels: int
    max_top_k: int
    devices: list[str]
    cpu_features: list[str] = Field(
        description="CPU flags that pick the fast paths (AMX, AVX512-BF16, VNNI, AVX2)"
    )
