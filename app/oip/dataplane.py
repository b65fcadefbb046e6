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

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app import __version__, imaging
from app.catalog import ModelSpec
from app.engine.batcher import Prediction, QueueFullError
from app.engine.decoding import Encoded, Item, decode_pixels
from app.errors import ModelNotReadyError, UploadTooLargeError
from app.oip.failures import ProtocolError, failure
from app.oip.types import InferRequest, InferResponse, InputTensor, OutputRequest, OutputTensor
from app.service import Service

log = logging.getLogger("imgcls.oip")

SERVER_NAME = "imgcls"
EXTENSIONS = ("classification", "binary_tensor_data", "model_repository")
VERSION = "1"  # each catalog model is one protocol model with one version
PLATFORM = "pytorch_torchvision"
IMAGE, PIXELS, PROBABILITIES = "IMAGE", "PIXELS", "PROBABILITIES"

# Model-repository states (Triton's names) for the service's model statuses.
STATES = {"ready": "READY", "loading": "LOADING"}


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


class ElementError(ValueError):
    """TEMP until core lands (``app.errors.ElementError``): image ``index`` of a request failed."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"element {index}: {cause}")
        self.index = index
        self.cause = cause


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
                f"model {name!r} has no version {version!r}; its versions: {VERSION}", 404
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
        return name in self.service.served and self.service.status(name).status == "ready"

    def check_servable(self, name: str, version: str | None = None) -> ModelSpec:
        """The model, if it can run now: before a request body is read (404, 503)."""
        self.spec(name, version)
        return self.service.servable(name).spec

    # ---- inference ---------------------------------------------------------------------------
    async def infer(self, req: InferRequest) -> InferResponse:
        spec = self.check_servable(req.model, req.version)
        tensor = _one_input(req.inputs, spec)
        wanted = _outputs(req)
        items = self._items(tensor, spec)
        settings = self.service.settings
        if len(items) > settings.max_queue:
            raise ProtocolError(
                f"{tensor.name}: {len(items)} images is more than the model's queue holds "
                f"(IMGCLS_MAX_QUEUE={settings.max_queue}); send them in smaller requests",
                413,
            )
        deadline = time.monotonic() + settings.request_timeout_s
        try:
            results = await _core_infer(self.service, spec.name, items, deadline)
        except Exception as exc:
            index, cause = getattr(exc, "index", None), getattr(exc, "cause", None)
            if isinstance(index, int) and isinstance(cause, BaseException):
                why = failure(cause)
                raise ProtocolError(f"{tensor.name}[{index}]: {why.message}", why.status) from exc
            raise
        probs = np.stack([r.probs for r in results]).astype(np.float32, copy=False)
        outputs = [_output(o, probs, spec) for o in wanted]
        return InferResponse(req.model, VERSION, req.id, outputs)

    def _items(self, tensor: InputTensor, spec: ModelSpec) -> list[bytes | torch.Tensor]:
        if tensor.name == IMAGE:
            assert isinstance(tensor.data, list)
            files = (
                [_from_base64(i, e) for i, e in enumerate(tensor.data)]
                if tensor.text
                else tensor.data
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
        pixels = np.array(tensor.data, dtype=np.float32).reshape(tensor.shape)  # a writable copy
        if not np.isfinite(pixels).all():
            raise ProtocolError(f"{PIXELS}: holds NaN or infinite values")
        return list(torch.from_numpy(pixels).unbind(0))

    # ---- model repository --------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        core = getattr(self.service, "repository_index", None)
        if core is not None:
            rows = [
                RepositoryEntry(r["name"], str(r["version"]), r["state"], r.get("reason") or "")
                for r in core()
            ]
        else:  # TEMP until core lands (Service.repository_index, issue 11)
            rows = [
                RepositoryEntry(
                    e["name"],
                    VERSION,
                    STATES.get(e["status"], "UNAVAILABLE"),
                    e["reason"] or ("" if e["status"] in STATES else e["status"]),
                )
                for e in self.service.model_entries()
            ]
        return [r for r in rows if r.state == "READY"] if ready_only else rows

    async def load(self, name: str) -> None:
        """Start ``name`` on the workers; returns once it is ready (503 when it failed)."""
        self.spec(name)
        core = getattr(self.service, "load", None)
        if core is None:  # TODO(core, issue 11): Service.load; until then, only started models
            if name not in self.service.served:
                raise ProtocolError(
                    f"loading {name!r} at run time needs engine support this build lacks "
                    f"(Service.load); start the service with it in IMGCLS_MODELS",
                    501,
                )
            status = self.service.status(name)
        else:
            status = await core(name)
        if status.status != "ready":
            raise ModelNotReadyError(
                f"model {name!r} did not load: {status.status}"
                + (f" ({status.reason})" if status.reason else ""),
                retry_after=5 if status.status == "loading" else 30,
            )

    async def unload(self, name: str) -> None:
        """Drain ``name``'s queue, then free it on the workers."""
        self.spec(name)
        core = getattr(self.service, "unload", None)
        if core is None:  # TODO(core, issue 11): Service.unload
            raise ProtocolError(
                f"unloading {name!r} needs engine support this build lacks (Service.unload)", 501
            )
        await core(name)


# ---- request checks -------------------------------------------------------------------------
def _one_input(inputs: Sequence[InputTensor], spec: ModelSpec) -> InputTensor:
    side = spec.input_size
    expected = f"{IMAGE} (BYTES [-1]) or {PIXELS} (FP32 [-1, 3, {side}, {side}])"
    unknown = [t.name for t in inputs if t.name not in (IMAGE, PIXELS)]
    if unknown:
        raise ProtocolError(f"unknown input {unknown[0]!r}; {spec.name} takes {expected}")
    if len(inputs) != 1:
        raise ProtocolError(f"send one input: {expected}, not both")
    t = inputs[0]
    if t.name == IMAGE:
        if t.datatype != "BYTES":
            raise ProtocolError(f"{IMAGE} must be BYTES, got {t.datatype}")
        if len(t.shape) != 1 or t.shape[0] < 1:
            raise ProtocolError(f"{IMAGE} must have shape [N] with N >= 1, got {t.shape}")
        return t
    if t.datatype != "FP32":
        raise ProtocolError(f"{PIXELS} must be FP32, got {t.datatype}")
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
            raise ProtocolError(f"unknown output {n!r}; the model's output is {PROBABILITIES}")
    if len(names) > 1:
        raise ProtocolError(f"output {PROBABILITIES} is requested more than once")
    return list(req.outputs)


def _from_base64(index: int, text: bytes) -> bytes:
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


# ---- the core call ---------------------------------------------------------------------------
async def _core_infer(
    service: Service, name: str, items: list[bytes | torch.Tensor], deadline: float
) -> Sequence[Prediction]:
    core = getattr(service, "infer", None)
    if core is not None:
        results: Sequence[Prediction] = await core(name, items, deadline)
        return results
    return await _infer_fallback(service, name, items, deadline)


async def _infer_fallback(
    service: Service, name: str, items: list[bytes | torch.Tensor], deadline: float
) -> list[Prediction]:
    """TEMP until core lands (``Service.infer``, issue 11): each image through ``predict``, all
    admitted or none, failing fast (the others are cancelled and dropped from the queue)."""
    batcher = service.batchers[name]
    if batcher.depth + len(items) > batcher.max_queue:
        raise QueueFullError(
            f"the queue for {name} has no room for {len(items)} images ({batcher.max_queue} max)"
        )
    spec = service.served[name].spec
    payloads = await asyncio.to_thread(_payloads, items, spec, service)
    tasks = [asyncio.ensure_future(service.predict(name, p, deadline)) for p in payloads]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for i, task in enumerate(tasks):
            exc = task.exception() if task.done() else None
            if exc is not None:
                if isinstance(exc, imaging.ImageError | imaging.ImageTooLargeError):
                    raise ElementError(i, exc)
                raise exc
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()


def _payloads(items: list[bytes | torch.Tensor], spec: ModelSpec, service: Service) -> list[Item]:
    """TEMP until core lands: what ``predict`` takes, uploads checked as ``/classify`` does."""
    settings = service.settings
    out: list[Item] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            out.append(item if item.dtype == torch.uint8 else _to_pixels(item, spec))
            continue
        try:
            if len(item) > settings.max_upload_bytes:
                raise UploadTooLargeError(f"{len(item):,} bytes is over IMGCLS_MAX_UPLOAD_MB")
            if service.decode_in_worker:
                probe = imaging.probe(item, settings.max_pixels)
                out.append(Encoded(item, probe.plain_jpeg))
            else:
                by_key, _, _ = decode_pixels(item, settings.max_pixels, {0: spec.transform})
                out.append(by_key[0])
        except (imaging.ImageError, imaging.ImageTooLargeError, UploadTooLargeError) as exc:
            raise ElementError(i, exc) from None
    return out


def _to_pixels(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """TEMP until core lands (``Service.infer`` takes normalised floats): undo the model's
    normalisation into uint8 pixels. Exact for tensors made by the model's own transform from
    an 8-bit image; other values are rounded to the nearest pixel level (and clamped)."""
    pre = spec.transform
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
    return ((x * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
