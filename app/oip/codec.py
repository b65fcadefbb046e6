"""Tensors on the wire: the protocol's JSON form and its binary tensor data extension.

A REST infer request is JSON, optionally followed by binary blobs: the header
``Inference-Header-Content-Length`` says how many bytes of the body are JSON, and each input
with the parameter ``binary_data_size`` takes that many bytes of what follows, in input order.
Outputs asked for with ``binary_data: true`` (or every output, with the request parameter
``binary_data_output``) come back the same way. Numeric tensors travel as little-endian values
in row-major order; a BYTES element as a 4-byte little-endian length and its bytes, as
tritonclient serialises them. The gRPC door uses the same raw forms for ``raw_input_contents``.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app import memory
from app.oip.failures import ProtocolError
from app.oip.types import (
    INPUT_DATATYPES,
    InferRequest,
    InferResponse,
    InputData,
    InputTensor,
    OutputRequest,
    TensorData,
)
from app.text import clip

T = TypeVar("T")

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*DTYPES, "BYTES")
MAX_DIMS = 8  # deeper shapes are refused before any element is counted
# Values in a request's JSON part (counted as its commas, before parsing): each becomes a Python
# object (~35 bytes) while the JSON is read, 20x its text. 2**21 holds 13 images of 3x224x224;
# larger tensors belong in the binary part (binary_data_size), as tritonclient sends them.
MAX_JSON_VALUES = 2**21
# A request (JSON part, or gRPC message) up to this size is read on the event loop; a larger one
# on a thread: a thread hop costs more than reading a small one.
PARSE_INLINE_BYTES = 64 * 1024

_LENGTH = struct.Struct("<I")


# ---- the JSON header, as pydantic reads it (and OpenAPI documents it) -------------------------
Dim = Annotated[int, Field(ge=0)]


class _Tensor(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    name: str = Field(min_length=1, max_length=256)
    shape: list[Dim] = Field(max_length=MAX_DIMS)
    datatype: str = Field(description=f"one of {', '.join(DATATYPES)}")
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: bytes of this input in the binary part of the body"
    )
    data: list[Any] | None = Field(
        None,
        description="the elements in row-major order, flat or nested; omitted when the data is "
        "binary. IMAGE elements in JSON are the image files in base64",
    )


class _RequestedOutput(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    name: str = Field(min_length=1, max_length=256)
    parameters: dict[str, Any] | None = Field(
        None, description="classification: k (top-k as BYTES); binary_data: true"
    )


class InferenceRequestBody(BaseModel):
    """A v2 inference request (the JSON part of the body)."""

    model_config = ConfigDict(strict=True, extra="allow")

    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: true answers every output as binary data"
    )
    inputs: list[_Tensor] = Field(min_length=1, max_length=16)
    outputs: list[_RequestedOutput] | None = Field(None, max_length=16)


# ---- elements ---------------------------------------------------------------------------------
def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements as tritonclient writes them: a 4-byte little-endian length, then the bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def deserialize_bytes(blob: bytes | memoryview, name: str, count: int) -> list[memoryview]:
    """The inverse of ``serialize_bytes``; the blob must hold exactly ``count`` elements.
    The elements are views into ``blob``, not copies."""
    out: list[memoryview] = []
    view = memoryview(blob)
    pos = 0
    while pos < len(view):
        if len(out) == count:
            raise ProtocolError(f"{clip(name)}: the binary data holds more than {count} elements")
        if pos + 4 > len(view):
            raise ProtocolError(f"{clip(name)}[{len(out)}]: truncated 4-byte length prefix")
        (n,) = _LENGTH.unpack_from(view, pos)
        pos += 4
        if pos + n > len(view):
            raise ProtocolError(
                f"{clip(name)}[{len(out)}]: says {n:,} bytes but only {len(view) - pos:,} remain"
            )
        out.append(view[pos : pos + n])
        pos += n
    if len(out) != count:
        raise ProtocolError(
            f"{clip(name)}: shape holds {count} elements but the data has {len(out)}"
        )
    return out


def tensor_from_raw(
    name: str, datatype: str, shape: list[int], raw: bytes | memoryview
) -> InputData:
    """An input's elements from its raw bytes (binary extension, gRPC raw_input_contents)."""
    count = element_count(shape)
    if datatype == "BYTES":
        return deserialize_bytes(raw, name, count)
    dtype = _dtype(name, datatype)
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(
            f"{clip(name)}: {datatype} shape {shape} needs {count * dtype.itemsize:,} bytes, "
            f"got {len(raw):,}"
        )
    return np.frombuffer(raw, dtype=dtype)


def tensor_from_list(
    name: str, datatype: str, shape: list[int], values: Sequence[Any]
) -> TensorData:
    """An input's elements from a flat list (gRPC typed contents, or flattened JSON data)."""
    count = element_count(shape)
    if len(values) != count:
        raise ProtocolError(
            f"{clip(name)}: shape {shape} holds {count} elements but the data has {len(values)}"
        )
    if datatype == "BYTES":
        if not all(isinstance(v, bytes) for v in values):
            raise ProtocolError(f"{clip(name)}: BYTES elements must be strings")
        return list(values)
    dtype = _dtype(name, datatype)
    kinds = (bool,) if datatype == "BOOL" else (int, float) if dtype.kind == "f" else (int,)
    if not all(type(v) in kinds for v in values):
        raise ProtocolError(f"{clip(name)}: {datatype} elements must be {_kind_name(datatype)}")
    try:
        return np.asarray(values, dtype=dtype)
    except (OverflowError, ValueError) as exc:
        raise ProtocolError(f"{clip(name)}: a value does not fit {datatype}: {exc}") from None


def tensor_from_typed(
    name: str, datatype: str, shape: list[int], values: Sequence[Any]
) -> TensorData:
    """An input's elements from gRPC's typed contents, whose element types protobuf has
    checked: counted against the shape before any is converted, then read into an array
    without a list of Python numbers in between."""
    count = element_count(shape)
    if len(values) != count:
        raise ProtocolError(
            f"{clip(name)}: shape {shape} holds {count} elements but the data has {len(values)}"
        )
    if datatype == "BYTES":
        return list(values)
    dtype = _dtype(name, datatype)
    try:
        return np.fromiter(values, dtype=dtype, count=count)
    except (OverflowError, ValueError) as exc:
        raise ProtocolError(f"{clip(name)}: a value does not fit {datatype}: {exc}") from None


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise ProtocolError(
            f"{clip(name)}: unknown or unsupported datatype {clip(datatype)!r}; "
            f"one of {', '.join(DATATYPES)}"
        )
    return dtype


def _kind_name(datatype: str) -> str:
    if datatype == "BOOL":
        return "true or false"
    return "numbers" if datatype.startswith("FP") else "integers"


def _flatten(name: str, data: list[Any]) -> list[Any]:
    """JSON data in row-major order as one list: flat, or nested as a regular array (every list
    at one depth as long as the others, scalars only at the innermost level; the shape's count
    is checked by the caller). Ragged data is refused, not run as if it were flat."""
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    lengths: list[int] = []  # per depth, the length every list there must have

    def walk(items: list[Any], depth: int) -> None:
        if depth == len(lengths):
            if depth >= MAX_DIMS:
                raise ProtocolError(f"{clip(name)}: data is nested deeper than {MAX_DIMS} levels")
            lengths.append(len(items))
        elif len(items) != lengths[depth]:
            raise ProtocolError(
                f"{clip(name)}: ragged data: lists of {lengths[depth]} and {len(items)} elements "
                f"at depth {depth + 1}"
            )
        nested = [isinstance(v, list) for v in items]
        if any(nested) and not all(nested):
            raise ProtocolError(f"{clip(name)}: data mixes lists and values at depth {depth + 1}")
        if not items or not nested[0]:
            if depth + 1 < len(lengths):  # a sibling went deeper
                raise ProtocolError(f"{clip(name)}: ragged data: values at depth {depth + 1}")
            flat.extend(items)
            return
        if depth + 1 == len(lengths) and flat:  # deeper than a sibling that held values
            raise ProtocolError(f"{clip(name)}: ragged data: lists at depth {depth + 2}")
        for v in items:
            walk(v, depth + 1)

    walk(data, 0)
    return flat


# ---- requests ---------------------------------------------------------------------------------
async def off_the_loop(
    gate: asyncio.Semaphore | None,
    fn: Callable[..., T],
    *args: Any,
    on_done: Callable[[], None] | None = None,
) -> T:
    """``fn(*args)`` on a thread, holding ``gate`` (if any) until the thread is done: a caller
    that stops waiting (its deadline, a client gone) does not stop the thread, and the gate's
    place (the memory a parse takes) is given back only when the thread gives it back.
    ``on_done`` is called then too (or at once if no thread was started)."""
    if gate is not None:
        try:
            await gate.acquire()
        except BaseException:
            if on_done is not None:
                on_done()
            raise
    try:
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    except BaseException:
        if gate is not None:
            gate.release()
        if on_done is not None:
            on_done()
        raise

    def done(f: asyncio.Future[T]) -> None:
        if gate is not None:
            gate.release()
        if on_done is not None:
            on_done()
        if not f.cancelled():
            f.exception()  # retrieved: no warning when nobody waits for it any more

    job.add_done_callback(done)
    return await asyncio.shield(job)


# ---- compressed requests (Content-Encoding), as Triton takes them ------------------------------
# tritonclient's request_compression_algorithm sends "gzip" or "deflate" (zlib); a raw deflate
# stream, which some clients send for "deflate", is taken too.
CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def content_coding(header: str | None) -> str | None:
    """A request's Content-Encoding: None for none (or identity), else one of CODINGS (415 for
    any other, or for more than one)."""
    codings = [c.strip().lower() for c in (header or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in CODINGS:
        raise ProtocolError(
            f"Content-Encoding {clip(header or '')!r} is not supported: send gzip, deflate or none",
            415,
        )
    return codings[0]


def _zlib_header(data: bytes | bytearray | memoryview) -> bool:
    return len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0


MAX_GZIP_MEMBERS = 64  # concatenated gzip streams in one body (tritonclient sends one)
_INFLATE_CHUNK = 1 << 20  # input fed per call: what zlib copies as unused data stays small


def inflate(body: bytes | bytearray, coding: str, limit: int, setting: str) -> bytearray:
    """``body`` decompressed (every member of a gzip stream), refused past ``limit`` bytes once
    decompressed (413, naming ``setting``: a small body can hold a huge one), when it is not
    ``coding``, is cut short or is followed by other bytes (400), and past MAX_GZIP_MEMBERS.
    The work is linear in the body and the output."""
    wbits = CODINGS[coding]
    if coding == "deflate" and not _zlib_header(body):
        wbits = -zlib.MAX_WBITS  # raw deflate, without zlib's header
    view = memoryview(body)
    out = bytearray()
    pos = members = 0
    while True:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise ProtocolError(f"the request body holds more than {MAX_GZIP_MEMBERS} gzip members")
        stream = zlib.decompressobj(wbits)
        while not stream.eof and pos < len(view):
            end = min(pos + _INFLATE_CHUNK, len(view))
            try:
                out += stream.decompress(view[pos:end], limit + 1 - len(out))
            except zlib.error as exc:
                raise ProtocolError(f"the request body is not valid {coding}: {exc}") from None
            if len(out) > limit:  # else the chunk was consumed whole (no unconsumed_tail)
                held, out = len(out), bytearray()
                memory.after_large_buffer(held)  # a bomb's output, on this thread
                raise ProtocolError(
                    f"the request is over {setting} ({limit:,} bytes) once decompressed", 413
                )
            pos = end - len(stream.unused_data)
        if not stream.eof:
            raise ProtocolError(f"the {coding} request body is cut short")
        rest = view[pos:]
        if rest and rest[0] == 0 and not rest.tobytes().strip(b"\0"):
            pos = len(view)  # gzip may be padded with zeros at the end
        if pos == len(view) or wbits != CODINGS["gzip"] or view[pos : pos + 2] != b"\x1f\x8b":
            break  # deflate is one stream; gzip may hold more members, each with its magic
    if pos < len(view):
        raise ProtocolError(f"{len(view) - pos:,} bytes follow the {coding} request body")
    return out


def json_part_size(body: bytes | bytearray, header_length: str | None) -> int:
    """How many bytes of a REST infer request are JSON (the rest is binary tensor data)."""
    try:
        return min(len(body), int(header_length)) if header_length is not None else len(body)
    except ValueError:
        return 0  # decode_request refuses it


def too_many_images(name: str, n: int, limit: int) -> ProtocolError:
    return ProtocolError(
        f"{clip(name)}: {n} images is more than the model's queue holds "
        f"(IMGCLS_MAX_QUEUE={limit}); send them in smaller requests",
        413,
    )


def check_batch(name: str, datatype: str, shape: Sequence[int], max_batch: int | None) -> None:
    """A tensor's first dimension (its images) within ``max_batch``, checked before its data
    is read: a few bytes per element can declare millions of them. A model input of another
    datatype is refused first, for that (a file sent as a UINT8 IMAGE is told to use BYTES,
    not to send fewer images); an input no model takes, for that (400, not a 413 for its
    size)."""
    if datatype != "BYTES":
        _dtype(name, datatype)  # a datatype the protocol does not have is named as such
    wanted = INPUT_DATATYPES.get(name)
    if wanted is None:
        takes = " or ".join(f"{n} ({d})" for n, d in INPUT_DATATYPES.items())
        raise ProtocolError(f"unknown input {clip(name)!r}; the models take {takes}")
    if datatype != wanted:
        raise ProtocolError(f"{name} must be {wanted}, got {clip(datatype)}")
    if max_batch is not None and shape and shape[0] > max_batch:
        raise too_many_images(name, shape[0], max_batch)


def decode_request(
    body: bytes | bytearray,
    header_length: str | None,
    model: str,
    version: str | None,
    max_batch: int | None = None,
) -> InferRequest:
    """A REST infer request: JSON alone, or JSON then binary blobs (``header_length`` bytes).
    A tensor of more than ``max_batch`` images is refused before its data is read (413).

    The binary part is not copied: BYTES elements (image files) are views into ``body``, and
    only the JSON header is copied out of it to be parsed."""
    view = memoryview(body)
    head: bytes | bytearray
    if header_length is None:
        head, rest = body, view[len(view) :]
    else:
        text = header_length.strip()
        if not (text.isascii() and text.isdigit()):
            raise ProtocolError(f"{HEADER_LENGTH} must be a whole number, got {clip(text)!r}")
        n = int(text)
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH}={n} does not fit the body of {len(body):,} bytes")
        head, rest = bytes(view[:n]), view[n:]
    if head.count(b",") >= MAX_JSON_VALUES:
        raise ProtocolError(
            f"the request's JSON holds more than {MAX_JSON_VALUES:,} values; send tensors this "
            "large as binary data (the parameter binary_data_size and "
            f"{HEADER_LENGTH})",
            413,
        )
    try:
        doc = InferenceRequestBody.model_validate_json(head)
    except ValidationError as exc:
        raise ProtocolError(f"invalid inference request: {_validation_message(exc)}") from None
    inputs: list[InputTensor] = []
    offset = 0
    names: set[str] = set()
    for t in doc.inputs:
        if t.name in names:
            raise ProtocolError(f"input {clip(t.name)!r} appears twice")
        names.add(t.name)
        check_batch(t.name, t.datatype, t.shape, max_batch)
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise ProtocolError(
                    f"{clip(t.name)}: binary_data_size must be a non-negative integer"
                )
            if t.data is not None:
                raise ProtocolError(f"{clip(t.name)}: has both 'data' and binary_data_size")
            if offset + size > len(rest):
                raise ProtocolError(
                    f"{clip(t.name)}: binary_data_size={size:,} runs past the end of the body "
                    f"({len(rest) - offset:,} binary bytes left)"
                )
            data = tensor_from_raw(t.name, t.datatype, t.shape, rest[offset : offset + size])
            offset += size
            inputs.append(InputTensor(t.name, t.datatype, t.shape, data))
        elif t.data is not None:
            inputs.append(_json_input(t))
        else:
            raise ProtocolError(f"{clip(t.name)}: no 'data' and no binary_data_size")
    if offset != len(rest):
        raise ProtocolError(
            f"the body has {len(rest) - offset:,} binary bytes that no input's binary_data_size "
            f"claims"
        )
    params = doc.parameters or {}
    binary_default = params.get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise ProtocolError("parameter binary_data_output must be true or false")
    outputs = None
    if doc.outputs:  # none named, or an empty list: every output (as gRPC reads it)
        outputs = [_requested(o.name, o.parameters or {}, binary_default) for o in doc.outputs]
    return InferRequest(
        model=model,
        version=version,
        id=doc.id,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_default,
    )


def _json_input(t: _Tensor) -> InputTensor:
    assert t.data is not None
    flat = _flatten(t.name, t.data)
    if t.datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"{clip(t.name)}: BYTES elements in JSON must be strings")
        data = tensor_from_list(t.name, "BYTES", t.shape, [v.encode() for v in flat])
        return InputTensor(t.name, t.datatype, t.shape, data, text=True)
    return InputTensor(
        t.name, t.datatype, t.shape, tensor_from_list(t.name, t.datatype, t.shape, flat)
    )


def _requested(name: str, params: dict[str, Any], binary_default: bool) -> OutputRequest:
    k = params.get("classification", 0)
    if type(k) is not int or k < 0:
        raise ProtocolError(
            f"{clip(name)}: classification must be a positive integer (top-k), got {clip(repr(k))}"
        )
    binary = params.get("binary_data", binary_default)
    if type(binary) is not bool:
        raise ProtocolError(f"{clip(name)}: binary_data must be true or false")
    return OutputRequest(name, k, binary)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# ---- responses --------------------------------------------------------------------------------
def encode_response(resp: InferResponse) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON then the binary outputs."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in resp.outputs:
        doc: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.binary:
            raw = raw_bytes(out.data)
            doc["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif isinstance(out.data, list):
            doc["data"] = [e.decode("utf-8", "replace") for e in out.data]
        else:
            doc["data"] = out.data.ravel().tolist()
        outputs.append(doc)
    head: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id is not None:
        head["id"] = resp.id
    head["outputs"] = outputs
    text = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return text, {"content-type": JSON_TYPE}
    return text + b"".join(blobs), {"content-type": BINARY_TYPE, HEADER_LENGTH: str(len(text))}


def raw_bytes(data: TensorData) -> bytes:
    """An output's elements as raw bytes (binary extension, gRPC raw_output_contents)."""
    if isinstance(data, list):
        return serialize_bytes(data)
    return np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
