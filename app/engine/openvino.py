"""OpenVINO's CPU plugin as the runtime of a CPU worker's models (IMGCLS_CPU_RUNTIME=openvino).

The same model the torch runtime would serve, with the same input handling in front
(``NormalizingModel``: uint8 pixels in, normalised inside, softmax out), is converted by
``openvino.convert_model`` and compiled by the CPU plugin:

- float models: converted from fp32 and compiled with the worker's precision as OpenVINO's
  ``INFERENCE_PRECISION_HINT`` (bf16 where the plugin lists BF16 among this CPU's
  capabilities, else f32), so the precision reported is the one that ran;
- int8 with torchvision's published weights: the quantized model itself is converted (its
  quantize, int8 convolution and dequantize ops become OpenVINO's), the float parts at the
  worker's precision as above;
- int8 calibrated on the user's images (IMGCLS_INT8_CALIBRATION): calibrated with FX (eager
  torch.ao ops, which OpenVINO converts; PT2E's exported graph does not trace), then converted.

Each input kind is compiled twice, both taking every batch size (a dynamic batch dimension:
as fast as a static one in a one-off comparison, resnet50 bf16 at batch 8 on a 2-core AMD EPYC,
three pairs: 51.3 / 51.2 / 51.4 against 48.6 / 49.6 / 51.3 images/s): once under the LATENCY
hint, one stream on all the worker's threads; and, where the worker has two threads or more,
once as two streams sharing them (OpenVINO's THROUGHPUT layout), over which a batch is split in
two halves run at once where the halves are near equal (``in_halves``). The worker still runs
one batch at a time; the split is inside it. On a 2-core Xeon with AMX, resnet50 bf16, the
split ran batches of 8-32 12-24% faster than one stream of two threads, while a single image
would run 41% slower on one thread (docs/PERFORMANCE.md); the second compiled model costs its
weights again (resnet50 bf16 ~115 MB, vgg16 ~470 MB). Already-normalised float input (/v2's FP32
PIXELS) gets models of its own, converted on the first such batch from the same torch model,
which is kept for it (as the torch runtime keeps its eager model beside the compiled graphs).
Explanations (Grad-CAM) keep running in torch, on the fp32 model the worker builds for them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger("imgcls.openvino")

# imgcls's precision names -> OpenVINO's INFERENCE_PRECISION_HINT
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def in_halves(n: int) -> bool:
    """Whether a batch of ``n`` images runs split over two streams (where the worker has two
    threads): where the larger half is at most 4/7 of the batch, as two halves run only as fast
    as the larger one on its one thread. On a 2-core Xeon with AMX, resnet50 bf16
    (bench/openvino_streams.py): 2, 4, 6, 8, 16 and 32 images ran 8-24% faster split, 3 (2 + 1)
    20% and 5 (3 + 2) 3% slower."""
    return n >= 2 and 7 * ((n + 1) // 2) <= 4 * n


@dataclasses.dataclass
class _Compiled:
    """One input kind's compiled models: ``whole``, the infer request of the one-stream model;
    ``halves``, the two infer requests of the two-stream one (empty with one thread)."""

    whole: Any
    halves: list[Any]


@functools.lru_cache(maxsize=1)
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def float_precision(wanted: str) -> str:
    """The precision OpenVINO runs a worker's float layers in: ``wanted`` (fp32 or bf16) where
    the CPU plugin has kernels for it, else fp32."""
    if wanted == "bf16" and "BF16" not in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return "fp32"
    return "fp32" if wanted not in _HINTS else wanted


class OpenVINOModel(nn.Module):
    """A model compiled by OpenVINO's CPU plugin, called like the torch model it came from:
    uint8 pixels (N, 3, S, S), or already-normalised float32 images, in; softmax probabilities
    (float32, N x classes) out. ``source`` is the torch model (``NormalizingModel``) converted:
    for uint8 input here, at load (this raises where OpenVINO cannot convert or compile it);
    for float input on the first such batch, converted and compiled during it (seconds, as
    torch's compiled graphs do for float input). ``source`` is kept for that: resnet50's fp32
    weights, ~100 MB, where the torch runtime keeps its eager model and a frozen copy of the
    weights per batch size. ``precision``: of the float layers, fp32 or bf16. One caller at a
    time (the worker's main thread)."""

    def __init__(self, source: nn.Module, input_size: int, precision: str, threads: int) -> None:
        super().__init__()
        self.source = source
        self.input_size = input_size
        self.precision = precision
        self.threads = threads
        self._requests: dict[torch.dtype, _Compiled] = {}
        self._request(torch.uint8)  # converted and compiled now, at load

    def _request(self, dtype: torch.dtype) -> _Compiled:
        if dtype not in self._requests:  # one caller at a time: no lock
            self._requests[dtype] = self._compile(dtype)
        return self._requests[dtype]

    def _compile(self, dtype: torch.dtype) -> _Compiled:
        import openvino as ov

        size = self.input_size
        example = torch.zeros(1, 3, size, size, dtype=dtype)
        with torch.inference_mode(False), torch.no_grad():  # traced, even inside a batch
            converted = ov.convert_model(self.source, example_input=example)
        converted.reshape([-1, 3, size, size])  # any batch size

        def compiled(streams: int) -> Any:
            config = {
                "INFERENCE_PRECISION_HINT": _HINTS[self.precision],
                "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
                "NUM_STREAMS": streams,
                "INFERENCE_NUM_THREADS": self.threads,  # shared by the streams
                # several CPU workers each pinning "their" threads would pin them to the same
                # cores (none knows of the others); torch's threads are not pinned either
                "ENABLE_CPU_PINNING": False,
            }
            return _core().compile_model(converted, "CPU", config)

        whole = compiled(1).create_infer_request()
        if self.threads < 2:
            return _Compiled(whole, [])
        split = compiled(2)
        return _Compiled(whole, [split.create_infer_request() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            x = x.to(torch.float32)
        compiled = self._request(x.dtype)
        pixels = x.contiguous().numpy()
        if compiled.halves and in_halves(len(pixels)):
            return torch.from_numpy(_run_in_halves(compiled.halves, pixels))
        out = compiled.whole.infer({0: pixels})  # outputs copied out (share_outputs)
        return torch.from_numpy(out[0])

    def release(self) -> None:
        """Drop the compiled models (on unload)."""
        self._requests.clear()


def _run_in_halves(requests: list[Any], pixels: np.ndarray) -> np.ndarray:
    """``pixels`` split over ``requests`` (one per stream), run at once; their outputs joined
    in order. Every started request is waited for before an error is raised, so that none is
    still running into its input when the next batch comes."""
    started, errors = [], []
    try:
        for request, part in zip(requests, np.array_split(pixels, len(requests)), strict=True):
            request.start_async({0: part})  # input copied into the request
            started.append(request)
    finally:
        for request in started:
            try:
                request.wait()
            except Exception as exc:  # the first is raised below
                errors.append(exc)
    if errors:
        raise errors[0]
    return np.concatenate([request.get_output_tensor(0).data for request in requests])
