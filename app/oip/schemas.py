"""The /v2 REST answers as OpenAPI documents them (the protocol's JSON objects)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class OipError(BaseModel):
    error: str = Field(description="what went wrong, naming the tensor, element or parameter")


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class OutputTensorDoc(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size when the data follows the JSON in binary"
    )
    data: list[Any] | None = Field(None, description="the elements in row-major order")


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensorDoc]


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    repository_name: str | None = Field(None, max_length=256)
    ready: bool = Field(False, description="only the models that are ready")


class RepositoryModelRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    parameters: dict[str, Any] | None = Field(None, description="accepted and ignored")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING or UNAVAILABLE")
    reason: str


class LoadResponse(BaseModel):
    name: str
    load: bool


class UnloadResponse(BaseModel):
    name: str
    unload: bool


# ---- the statistics extension (Triton's), see app/engine/stats.py -------------------------------
class StatisticDuration(BaseModel):
    count: int
    ns: int = Field(description="total nanoseconds")


class InferStatistics(BaseModel):
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    cache_hit: StatisticDuration
    cache_miss: StatisticDuration


class InferBatchStatistics(BaseModel):
    batch_size: int
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="ms since the epoch of the last batch (0: none)")
    inference_count: int = Field(description="images computed")
    execution_count: int = Field(description="batches run")
    inference_stats: InferStatistics = Field(description="counted per image")
    batch_stats: list[InferBatchStatistics]
    memory_usage: list[dict[str, Any]]
    response_stats: dict[str, Any]


class ModelStatisticsResponse(BaseModel):
    model_stats: list[ModelStatistics]
