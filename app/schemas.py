"""Pydantic models of the public HTTP contract."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    total: float = Field(description="request received to response ready, ms")


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
    backend: str = Field(description="eager, or inductor (torch.compile)")
    predictions: list[ClassScore]
    latency_ms: Latency
    batch_size: int = Field(description="size of the batch this image actually ran in")
    request_id: str


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


class Agreement(BaseModel):
    top1_consensus: Consensus | None
    pairwise: list[Pairwise]


class CompareLatency(BaseModel):
    decode: float
    total: float


class CompareResponse(BaseModel):
    results: list[ClassifyResponse]
    agreement: Agreement
    latency_ms: CompareLatency
    request_id: str


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
