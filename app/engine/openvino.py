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

One compiled model per input kind takes every batch size (a dynamic batch dimension: as fast
as a static one in a one-off comparison, resnet50 bf16 at batch 8 on a 2-core AMD EPYC,
three pairs: 51.3 / 51.2 / 51.4 against 48.6 / 49.6 / 51.3 images/s),
under the LATENCY hint with one stream on the worker's threads: the worker runs one batch at a
time. Already-normalised float input (/v2's FP32 PIXELS) gets a model of its own, converted on
the first such batch from the same torch model, which is kept for it (as the torch runtime
keeps its eager model beside the compiled graphs). Explanations (Grad-CAM) keep running in
torch, on the fp32 model the worker builds for them.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("imgcls.openvino")

# imgcls's precision names -> OpenVINO's INFERENCE_PRECISION_HINT
_HINTS = {"fp32": "f32", "bf16": "bf16"}


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
        self._requests: dict[torch.dtype, Any] = {}
        self._request(torch.uint8)  # converted and compiled now, at load

    def _request(self, dtype: torch.dtype) -> Any:
        if dtype not in self._requests:  # one caller at a time: no lock
            self._requests[dtype] = self._compile(dtype)
        return self._requests[dtype]

    def _compile(self, dtype: torch.dtype) -> Any:
        import openvino as ov

        size = self.input_size
        example = torch.zeros(1, 3, size, size, dtype=dtype)
        with torch.inference_mode(False), torch.no_grad():  # traced, even inside a batch
            converted = ov.convert_model(self.source, example_input=example)
        converted.reshape([-1, 3, size, size])  # any batch size
        config = {
            "INFERENCE_PRECISION_HINT": _HINTS[self.precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": self.threads,
            # several CPU workers each pinning "their" threads would pin them to the same cores
            # (none knows of the others); torch's threads are not pinned either
            "ENABLE_CPU_PINNING": False,
        }
        compiled = _core().compile_model(converted, "CPU", config)
        return compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            x = x.to(torch.float32)
        request = self._request(x.dtype)
        out = request.infer({0: x.contiguous().numpy()})  # outputs copied out (share_outputs)
        return torch.from_numpy(out[0])

    def release(self) -> None:
        """Drop the compiled models (on unload)."""
        self._requests.clear()
