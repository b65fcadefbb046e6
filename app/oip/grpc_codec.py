"""The gRPC messages of the protocol to and from the data plane's types.

Imports the generated stubs: load it only where the gRPC server runs (see app/oip/__init__.py).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from app.oip import codec
from app.oip.dataplane import ModelMetadata, RepositoryEntry
from app.oip.failures import ProtocolError
from app.oip.generated import grpc_predict_v2_pb2 as pb
from app.oip.types import InferRequest, InferResponse, InputTensor, OutputRequest
from app.text import clip

# Where InferTensorContents keeps each datatype's elements (FP16 travels raw only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


# The limits REST puts on the same fields (its schema, app/oip/codec.py, and its path pattern
# for a model's name and version, app/oip/rest.py): protobuf has none.
MAX_NAME = 256
MAX_MODEL_NAME = 128
MAX_TENSORS = 16


def _bounded(what: str, value: str, limit: int = MAX_NAME) -> str:
    if len(value) > limit:
        raise ProtocolError(f"{what} is {len(value):,} characters long; at most {limit}")
    return value


NAME_FIELDS = ("name", "version", "model_name", "model_version", "repository_name")


def bounded_names(msg: Any) -> None:
    """A request's model name and version (and repository name) within REST's 128 characters,
    for every call that takes them: a longer one is refused as malformed (INVALID_ARGUMENT, as
    REST's 400), not looked up (NOT_FOUND quoting it)."""
    for field in NAME_FIELDS:
        value = getattr(msg, field, None)
        if isinstance(value, str):
            _bounded(field, value, MAX_MODEL_NAME)


def infer_request(msg: pb.ModelInferRequest, max_batch: int | None = None) -> InferRequest:
    """A ModelInfer message's request; a tensor of more than ``max_batch`` images is refused
    before its data is read."""
    _bounded("model_name", msg.model_name, MAX_MODEL_NAME)
    _bounded("model_version", msg.model_version, MAX_MODEL_NAME)
    _bounded("id", msg.id)
    if len(msg.inputs) > MAX_TENSORS or len(msg.outputs) > MAX_TENSORS:
        raise ProtocolError(f"at most {MAX_TENSORS} inputs and {MAX_TENSORS} outputs")
    for t in msg.inputs:
        _bounded("an input's name", t.name)
        _bounded(f"{clip(t.name)}: datatype", t.datatype, 16)
    for o in msg.outputs:
        _bounded("an output's name", o.name)
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; "
            f"use it for every input or none"
        )
    inputs = []
    for i, t in enumerate(msg.inputs):
        shape = list(t.shape)
        if len(shape) > codec.MAX_DIMS or any(d < 0 for d in shape):
            raise ProtocolError(f"{clip(t.name)}: invalid shape {shape}")
        codec.check_batch(t.name, t.datatype, shape, max_batch)
        if raw:
            data = codec.tensor_from_raw(t.name, t.datatype, shape, raw[i])
        elif t.datatype in CONTENTS:
            data = codec.tensor_from_typed(
                t.name, t.datatype, shape, getattr(t.contents, CONTENTS[t.datatype])
            )
        else:
            raise ProtocolError(
                f"{clip(t.name)}: {clip(t.datatype)!r} data must come in raw_input_contents"
            )
        inputs.append(InputTensor(t.name, t.datatype, shape, data))
    outputs = [OutputRequest(o.name, _classification(o)) for o in msg.outputs] or None
    return InferRequest(msg.model_name, msg.model_version or None, msg.id or None, inputs, outputs)


def _classification(o: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    if "classification" not in o.parameters:
        return 0
    k = parameter(o.parameters["classification"])
    if type(k) is not int or k < 0:
        raise ProtocolError(
            f"{clip(o.name)}: classification must be a positive integer, got {clip(repr(k))}"
        )
    return k


def infer_response(resp: InferResponse) -> pb.ModelInferResponse:
    """Outputs as raw_output_contents, as Triton answers."""
    msg = pb.ModelInferResponse(
        model_name=resp.model_name, model_version=resp.model_version, id=resp.id or ""
    )
    for out in resp.outputs:
        msg.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        msg.raw_output_contents.append(codec.raw_bytes(out.data))
    return msg


def model_metadata(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
    )


def repository_index(entries: list[RepositoryEntry]) -> pb.RepositoryIndexResponse:
    index = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            index(name=e.name, version=e.version, state=e.state, reason=e.reason) for e in entries
        ]
    )


def model_statistics(stats: list[dict[str, Any]]) -> pb.ModelStatisticsResponse:
    """The statistics extension's answer: the REST JSON's fields are the message's."""
    return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())
