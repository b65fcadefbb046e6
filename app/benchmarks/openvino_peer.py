"""OpenVINO, the runtime CPU users pick instead of PyTorch, as a model-only peer.

The same torchvision model with the same input handling (``NormalizingModel``: uint8 pixels in,
normalised inside, softmax out) is converted with ``openvino.convert_model`` and compiled for the
CPU at the best precision OpenVINO reports for this CPU (bf16 where it lists BF16 among the CPU's
optimisation capabilities, as on AVX512-BF16 or AMX; f32 elsewhere). It runs under its own
THROUGHPUT hint with an async request queue of the size OpenVINO recommends: OpenVINO at its best
on this machine, not held to imgcls's one-batch-at-a-time loop. Beside imgcls's int8 it runs the
same model quantized to int8 by NNCF (``pip install nncf``), OpenVINO's own int8 path.
Throughput is measured at the same batch sizes as imgcls's model-only figures. Without the
``openvino`` (or ``nncf``) package the result says so instead of failing the whole benchmark.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from app.catalog import build_catalog
from app.engine.worker import NormalizingModel


def best_precision(core: Any) -> str:
    """bf16 where OpenVINO's CPU plugin has bf16 kernels for this CPU, else f32."""
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in caps else "f32"


def throughput_queue(core: Any, ov_model: Any, precision: str) -> Any:
    """``ov_model`` (its input shape set) compiled for the CPU under OpenVINO's THROUGHPUT hint
    at ``precision`` (OpenVINO's name: bf16 or f32), with an async request queue of the size
    OpenVINO recommends: OpenVINO at its best on this machine."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "THROUGHPUT"}
    compiled = core.compile_model(ov_model, "CPU", config)
    return ov.AsyncInferQueue(
        compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    )


def queue_rate(queue: Any, x: Any, seconds: float) -> float:
    """Images/s of ``queue`` kept full with the batch ``x`` for ``seconds``, after every request
    has run once."""
    for _ in range(len(queue)):  # warm-up: every request once
        queue.start_async({0: x})
    queue.wait_all()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        queue.start_async({0: x})  # blocks while every request is busy
        n += len(x)
    queue.wait_all()
    return n / (time.perf_counter() - start)


def _quantize(ov_model: Any, size: int) -> Any:
    """int8 by NNCF's post-training quantization, OpenVINO's own int8 path. Calibrated on random
    pixels: the weights are random too, and only the speed of the int8 graph is measured."""
    import nncf

    gen = torch.Generator().manual_seed(0)
    samples = [
        torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=gen).numpy()
        for _ in range(16)
    ]
    return nncf.quantize(ov_model, nncf.Dataset(samples), subset_size=len(samples))


def model_only(
    model: str, batch_sizes: list[int], seconds: float = 5.0, int8: bool = False
) -> dict[str, Any]:
    """images/s per batch size of ``model`` (random weights) on OpenVINO's CPU plugin; with
    ``int8``, the model quantized by NNCF (float parts at the best precision as before)."""
    try:
        import openvino as ov
    except ImportError as exc:
        return {"available": False, "reason": f"openvino is not installed ({exc})"}
    if int8:
        try:
            import nncf  # noqa: F401
        except ImportError as exc:
            return {"available": False, "reason": f"nncf is not installed ({exc})"}
    spec = build_catalog().get(model)
    plan = spec.load_plan(None)
    pre = plan.preprocess
    torch_model = NormalizingModel(
        plan.builder().eval(), pre.mean, pre.std, torch.float32, False
    ).eval()
    size = plan.input_size
    example = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    core = ov.Core()
    precision = best_precision(core)
    t0 = time.perf_counter()
    with torch.no_grad():
        ov_model = ov.convert_model(torch_model, example_input=example)
    if int8:
        ov_model = _quantize(ov_model, size)
    convert_s = time.perf_counter() - t0
    per_batch: dict[int, float] = {}
    requests = 0
    for bs in batch_sizes:
        ov_model.reshape([bs, 3, size, size])
        queue = throughput_queue(core, ov_model, precision)
        requests = len(queue)
        x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8).numpy()
        per_batch[bs] = round(queue_rate(queue, x, seconds), 2)
        del queue
    best = max(per_batch, key=lambda b: per_batch[b])
    return {
        "available": True,
        "version": ov.get_version(),
        "precision": "int8" if int8 else precision,
        "float_precision": precision,
        "performance_hint": "THROUGHPUT",
        "infer_requests": requests,
        "convert_s": round(convert_s, 1),
        "images_per_s_by_batch": per_batch,
        "best_batch": best,
        "best_images_per_s": per_batch[best],
    }
