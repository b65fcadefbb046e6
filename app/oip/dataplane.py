"""The Open Inference Protocol's logic over the service core, with no web framework in sight.

Both doors (REST in ``rest.py``, gRPC in ``grpc_server.py``) convert a request into the types of
``app.oip.types``, call one method here and convert the answer back, as KServe's and MLServer's
``DataPlane`` do. Every model of the catalog is a protocol model with one version, ``"1"``:

- input ``IMAGE`` (BYTES ``[-1]``): N encoded image files, checked and decoded exactly like
  ``/classify`` uploads (the OpenVINO Model Server convention); in JSON, each file in base64;
- input ``PIXELS`` (FP32 ``[-1, 3, S, S]``): N images already resized, cropped and normalised
  for the model by the client;
- output ``PROBABILITIES`` (FP32 ``[-1, C]``), or with the classification extension's parameter
  ``classification: k``, BYTES ``[N, k]`` strings ``"<score>:<index>:<label>"``, best first.

The N images of a request are admitted to the model's queue together and batched with everyone
else's. Client mistakes raise ``ProtocolError`` (400) naming the tensor, element or parameter.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from app import __version__
from app.catalog import ModelSpec
from app.engine.stats import ModelStats
from app.errors import ElementError, ModelNotReadyError, ModelNotServedError
from app.imaging import BytesLike
from app.oip import codec
from app.oip.failures import ProtocolError, failure
from app.oip.types import (
    IMAGE,
    INPUT_DATATYPES,
    PIXELS,
    PROBABILITIES,
    InferRequest,
    InferResponse,
    InputTensor,
    OutputRequest,
    OutputTensor,
)
from app.service import Service
from app.text import clip

log = logging.getLogger("imgcls.oip")

SERVER_NAME = "imgcls"
EXTENSIONS = ("classification", "binary_tensor_data", "model_repository", "statistics")
VERSION = "1"  # each catalog model is one protocol model with one version
PLATFORM = "pytorch_torchvision"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


@dataclass(frozen=True)
class RepositoryEntry:
    name: str
    version: str
    state: str  # READY | LOADING | UNAVAILABLE
    reason: str


class DataPlane:
    def __init__(self, service: Service) -> None:
        self.service = service

    # ---- health and metadata -----------------------------------------------------------------
    def live(self) -> bool:
        return True  # answering at all is the proof

    def ready(self) -> bool:
        return self.service.is_ready()[0]

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def spec(self, name: str, version: str | None = None) -> ModelSpec:
        """The catalog model ``name`` (UnknownModelError: 404) at ``version`` (only "1")."""
        spec = self.service.catalog.get(name)
        if version not in (None, "", VERSION):
            raise ProtocolError(
                f"model {clip(name)!r} has no version {clip(version)!r}; its versions: {VERSION}",
                404,
            )
        return spec

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        spec = self.spec(name, version)
        side = spec.input_size
        return ModelMetadata(
            name=name,
            versions=[VERSION],
            platform=PLATFORM,
            inputs=[
                TensorMeta(IMAGE, "BYTES", [-1]),
                TensorMeta(PIXELS, "FP32", [-1, 3, side, side]),
            ],
            outputs=[TensorMeta(PROBABILITIES, "FP32", [-1, spec.num_classes])],
        )

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self.spec(name, version)
        return self.service.status(name).status == "ready"  # "not-loaded" when not served

    def statistics(self, name: str = "", version: str | None = None) -> list[dict[str, Any]]:
        """Triton's ModelStatistics of ``name`` (404 unless it is loaded by this service), or,
        with no name, of every model it loads (see engine/stats.py)."""
        if not name:
            names = list(self.service.served)
        else:
            self.spec(name, version)
            if name not in self.service.served:
                raise ModelNotServedError(f"model {clip(name)!r} is not loaded by this service")
            names = [name]
        out = []
        for n in names:
            batcher = self.service.batchers.get(n)  # none yet while it starts: all zero
            out.append((batcher.stats if batcher else ModelStats()).as_dict(n, VERSION))
        return out

    def check_servable(self, name: str, version: str | None = None) -> ModelSpec:
        """The model, if it can run now: before a request body is read (404, 503)."""
        self.spec(name, version)
        return self.service.servable(name).spec

    # ---- inference ---------------------------------------------------------------------------
    async def infer(self, req: InferRequest, deadline: float | None = None) -> InferResponse:
        """``deadline`` (monotonic): the request's, taken before its body was parsed."""
        spec = self.check_servable(req.model, req.version)
        tensor = _one_input(req.inputs, spec)
        wanted = _outputs(req)
        items = self._items(tensor, spec)
        limit = self.service.settings.max_queue
        if len(items) > limit:  # the doors check the shape before reading the data, too
            raise codec.too_many_images(tensor.name, len(items), limit)
        try:
            results = await self.service.infer(spec.name, items, deadline)
        except ElementError as exc:
            why = failure(exc.cause)
            if why.internal:
                raise  # a server fault: the door logs it and answers the generic message
            raise ProtocolError(
                f"{clip(tensor.name)}[{exc.index}]: {why.message}", why.status, why.retry_after
            ) from exc
        probs = np.stack([r.probs for r in results]).astype(np.float32, copy=False)
        outputs = [_output(o, probs, spec) for o in wanted]
        return InferResponse(req.model, VERSION, req.id, outputs)

    def _items(self, tensor: InputTensor, spec: ModelSpec) -> list[BytesLike | torch.Tensor]:
        if tensor.name == IMAGE:
            assert isinstance(tensor.data, list)
            elements = cast("list[BytesLike]", tensor.data)  # views into the body: no copy
            files = (
                [_from_base64(i, e) for i, e in enumerate(elements)] if tensor.text else elements
            )
            limit = self.service.settings.max_upload_bytes
            for i, f in enumerate(files):
                if len(f) > limit:
                    raise ProtocolError(
                        f"{IMAGE}[{i}]: {len(f):,} bytes is over the limit of {limit:,} "
                        f"(IMGCLS_MAX_UPLOAD_MB)",
                        413,
                    )
            return list(files)
        assert not isinstance(tensor.data, list)
        # Normalised floats go to the core as they are (it refuses NaN and infinities).
        pixels = np.array(tensor.data, dtype=np.float32).reshape(tensor.shape)  # a writable copy
        return list(torch.from_numpy(pixels).unbind(0))

    # ---- model repository --------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        rows = [
            RepositoryEntry(r["name"], str(r["version"]), r["state"], r["reason"] or "")
            for r in self.service.repository_index()
        ]
        return [r for r in rows if r.state == "READY"] if ready_only else rows

    def _check_control(self, action: str) -> None:
        if self.service.settings.model_control != "explicit":
            raise ProtocolError(
                f"{action} models is off on this server; start it with "
                "IMGCLS_MODEL_CONTROL=explicit to control the repository over the API",
                403,
            )

    async def load(self, name: str) -> None:
        """Start ``name`` on the workers; returns once it is ready (503 with the reason when it
        failed, or is still loading after IMGCLS_WORKER_STARTUP_TIMEOUT_S). 403 unless
        IMGCLS_MODEL_CONTROL=explicit."""
        self._check_control("loading")
        status = await self.service.load(name)  # UnknownModelError: 404
        if status.status != "ready":
            raise ModelNotReadyError(
                f"model {clip(name)!r} did not load: {status.status}"
                + (f" ({status.reason})" if status.reason else ""),
                retry_after=5 if status.status == "loading" else 30,
            )

    async def unload(self, name: str) -> None:
        """Stop admitting requests for ``name`` (404), let its queue drain, then free it on the
        workers. Unloading a catalog model that is not loaded is a no-op, as in Triton. 403
        unless IMGCLS_MODEL_CONTROL=explicit."""
        self._check_control("unloading")
        await self.service.unload(name)  # UnknownModelError: 404


# ---- request checks -------------------------------------------------------------------------
def _one_input(inputs: Sequence[InputTensor], spec: ModelSpec) -> InputTensor:
    side = spec.input_size
    expected = f"{IMAGE} (BYTES [-1]) or {PIXELS} (FP32 [-1, 3, {side}, {side}])"
    unknown = [t.name for t in inputs if t.name not in (IMAGE, PIXELS)]
    if unknown:
        raise ProtocolError(f"unknown input {clip(unknown[0])!r}; {spec.name} takes {expected}")
    if not inputs:
        raise ProtocolError(f"no input: send one, {expected}")
    if len(inputs) != 1:
        names = [t.name for t in inputs]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ProtocolError(f"input {clip(twice)!r} appears more than once; send it once")
        raise ProtocolError(f"send one input: {expected}, not both")
    t = inputs[0]
    if t.datatype != INPUT_DATATYPES[t.name]:  # the doors' codecs refuse it first, as here
        raise ProtocolError(f"{t.name} must be {INPUT_DATATYPES[t.name]}, got {clip(t.datatype)}")
    if t.name == IMAGE:
        if len(t.shape) != 1 or t.shape[0] < 1:
            raise ProtocolError(f"{IMAGE} must have shape [N] with N >= 1, got {t.shape}")
        return t
    if len(t.shape) != 4 or t.shape[0] < 1 or t.shape[1:] != [3, side, side]:
        raise ProtocolError(
            f"{PIXELS} for {spec.name} must have shape [N, 3, {side}, {side}] with N >= 1, "
            f"got {t.shape}"
        )
    return t


def _outputs(req: InferRequest) -> list[OutputRequest]:
    if req.outputs is None:
        return [OutputRequest(PROBABILITIES, 0, req.binary_outputs)]
    names = [o.name for o in req.outputs]
    for n in names:
        if n != PROBABILITIES:
            raise ProtocolError(
                f"unknown output {clip(n)!r}; the model's output is {PROBABILITIES}"
            )
    if len(names) > 1:
        raise ProtocolError(f"output {PROBABILITIES} is requested more than once")
    return list(req.outputs)


def _from_base64(index: int, text: BytesLike) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(
            f"{IMAGE}[{index}]: not valid base64; in JSON each {IMAGE} element is an image file "
            f"in base64 (or send it as binary data, see Inference-Header-Content-Length)"
        ) from None


def _output(req: OutputRequest, probs: np.ndarray[Any, Any], spec: ModelSpec) -> OutputTensor:
    n, classes = probs.shape
    if not req.classification:
        return OutputTensor(PROBABILITIES, "FP32", [n, classes], probs, req.binary)
    k = min(req.classification, classes)
    order = np.lexsort((np.broadcast_to(np.arange(classes), probs.shape), -probs), axis=-1)[:, :k]
    rows = [f"{probs[r, i]:f}:{i}:{spec.labels[i]}".encode() for r in range(n) for i in order[r]]
    return OutputTensor(PROBABILITIES, "BYTES", [n, k], rows, req.binary)
