"""A device worker: a separate process that owns its models and runs batches in inference mode.

It runs in its own process so that a model that crashes (a segfault, the OOM killer, a CUDA fault)
cannot take the API down. Batches arrive as shared-memory tensors of 8-bit pixels; normalisation,
the precision cast and the memory format run here, on the device, inside the (compiled) model, so
the API process hands over a quarter of the bytes and does none of that arithmetic. Probabilities
go back as arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from app.engine import fastpath
from app.engine.checkpoint import load_into
from app.engine.decoding import Decoder, Encoded, Prepared
from app.engine.plan import LoadPlan
from app.memory import collect, settle
from app.preprocess import normalize

if TYPE_CHECKING:
    from app.preprocess import Preprocess
    from app.settings import Settings

log = logging.getLogger("imgcls.worker")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: int
    device: str
    precision: str  # fp32 | bf16 | fp16, already resolved for the device
    channels_last: bool
    compile: bool
    threads: int | None
    warmup_batch: int
    plans: list[LoadPlan] = field(default_factory=list)
    max_pixels: int = 40_000_000  # for uploads decoded in the worker (IMGCLS_DECODE=worker)
    # plain JPEGs to torchvision.io's decoder (nvjpeg on CUDA) where it measures faster (Decoder)
    jpeg_on_device: bool = False
    jpeg_draft: bool = False  # Pillow decodes JPEGs at a reduced DCT scale (IMGCLS_JPEG_DRAFT)
    auto_batch: bool = False  # time batch sizes up to warmup_batch at load (IMGCLS_MAX_BATCH_SIZE)
    # CPU graphs call their kernels from compiled C++, not Python (IMGCLS_CPP_WRAPPER; see _Graph)
    cpp_wrapper: bool = False
    # what runs the models on a CPU worker: torch, or OpenVINO's CPU plugin (app/engine/openvino)
    runtime: str = "torch"
    # threads decoding uploads (IMGCLS_DECODE=worker); None: ``threads``, else torch's default
    decode_threads: int | None = None
    # the worker process's logging (IMGCLS_LOG_LEVEL, IMGCLS_LOG_FORMAT), as the API process's;
    # None: left as Python's (a Runner in another process: tests, the bench, Ray)
    log_level: str | None = None
    log_format: str = "json"
    # how the pool started this worker ("spawn", "forkserver"; pool._context)
    start_method: str = "spawn"

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        device: str,
        *,
        worker_id: int = 0,
        threads: int | None = None,
        plans: list[LoadPlan] | None = None,
        decode_in_worker: bool = False,
        decode_threads: int | None = None,
        auto_batch: bool | None = None,
        precision: str | None = None,
        warmup_batch: int | None = None,
    ) -> WorkerConfig:
        """A worker's configuration from the service's settings, the one place where every
        setting a Runner runs by is read: the pool's workers, Ray's replicas, the bench's
        model-only and LitServe's peer all build theirs here, so a new setting reaches each.
        ``decode_in_worker``: uploads reach this worker encoded (IMGCLS_DECODE=worker), and its
        tensor decoder is timed against Pillow per size at load. ``auto_batch`` (default: the
        setting) times batch sizes at load and keeps the best; ``precision`` and
        ``warmup_batch`` (the largest batch) replace the settings' where given."""
        fast = fastpath.resolve(
            precision or settings.precision, settings.channels_last, settings.compile, device
        )
        return cls(
            worker_id=worker_id,
            device=device,
            precision=fast.precision,
            channels_last=fast.channels_last,
            compile=fast.compile,
            threads=threads if device == "cpu" else None,
            warmup_batch=warmup_batch or settings.batch_cap,
            plans=list(plans or []),
            max_pixels=settings.max_pixels,
            jpeg_on_device=decode_in_worker,
            jpeg_draft=settings.jpeg_draft,
            auto_batch=settings.max_batch_size == "auto" if auto_batch is None else auto_batch,
            cpp_wrapper=settings.cpp_wrapper,
            runtime=settings.cpu_runtime,
            decode_threads=decode_threads,
            log_level=settings.log_level,
            log_format=settings.log_format,
        )


HEARTBEAT_S = 1.0

# Messages to the worker: ("batch", batch_id, name, batch) | ("load", LoadPlan) | ("unload", name)
# | ("explain", batch_id, name, pixels, target) | None (stop).
#   pixels: uint8 (N, 3, S, S) as the model sees them; target: a class index or None (top-1)
# Messages from the worker (tuples keep pickling cheap):
#   ("status", name, status, reason, info)   status: loading | ready | failed | unloaded
#   ("result", batch_id, probs, start_monotonic, inference_ms, (precision, backend, cuda_bytes),
#    items)   items: None for a pixel batch; for uploads decoded here
#             (rows, errors, decode_ms, preprocess_ms), as in decoding.Prepared
#   ("error", batch_id, message, "failed" | "unavailable": a job refused, with the reason)
#   ("explained", batch_id, heatmaps, targets, scores, overlays, start_monotonic, explain_ms)
#             heatmaps (N, S, S) float32 in [0, 1]; targets int64, scores float32 (N,);
#             overlays: one PNG (bytes) per image, the heatmap blended on its pixels
#   ("started", pid)
#   ("heartbeat", monotonic)   every HEARTBEAT_S from a thread of its own, busy or idle


def plan_precision(plan: LoadPlan, cfg: WorkerConfig) -> str:
    """The precision ``plan`` runs in on this worker: its own (int8) or the worker's."""
    return plan.precision or cfg.precision


class CheckpointChangedError(RuntimeError):
    """The checkpoint a model was loaded from is gone or was replaced since: its fp32 copy for
    explanations cannot be the network that serves (HTTP 503, with this message)."""


def _file_identity(path: str | None) -> tuple[int, ...] | None:
    """What tells one file from another at ``path`` (device, inode, size, modification time),
    or None when there is none."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _network(plan: LoadPlan) -> nn.Module:
    """``plan``'s network with its checkpoint loaded (on the CPU first, weights_only=True); with
    none (IMGCLS_ALLOW_RANDOM_WEIGHTS), random weights drawn from a seed of the model's name,
    so that every worker, and the fp32 copy explanations run on, hold the same network."""
    if plan.weights_path is None:
        with torch.random.fork_rng(devices=[]):  # the CPU's generator, which builds it
            torch.default_generator.manual_seed(zlib.crc32(plan.name.encode()))
            return plan.builder()
    model = plan.builder()
    load_into(model, Path(plan.weights_path))
    return model


def _build(plan: LoadPlan, cfg: WorkerConfig) -> nn.Module:
    if plan_precision(plan, cfg) == "int8":
        return _build_int8(plan, cfg)
    model = _network(plan)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model = fold_batch_norm(model)
    model = model.to(device=torch.device(cfg.device), dtype=DTYPES[cfg.precision])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pre = plan.preprocess
    return NormalizingModel(model, pre.mean, pre.std, DTYPES[cfg.precision], cfg.channels_last)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Batch norm folded into the convolution before it (inference only), in float32, before
    any cast to bf16 or fp16: one convolution with adjusted weights and bias instead of a
    convolution and a normalisation over its whole output. resnet50 bf16 compiled on AVX512-BF16
    (AMD EPYC, 2 cores): 44.2 -> 46.8 images/s (docs/PERFORMANCE.md); fp32 folds give the same
    answers to float rounding, and the accuracy guard holds every served path to fp32 eager.
    A model that torch.fx cannot trace (some custom ones) is served as it is."""
    from torch.fx.experimental.optimization import fuse

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        return fuse(model)
    except Exception as exc:  # untraceable control flow: unfolded, still correct
        log.info("batch norm left unfolded in %s: %s", type(model).__name__, exc)
        return model


def _build_int8(plan: LoadPlan, cfg: WorkerConfig) -> nn.Module:
    """An int8 model, eager, on fp32 input (normalised here; int8 inside, no bf16 cast, no
    channels_last). Published weights: the builder makes the converted quantizable model and the
    int8 state_dict is loaded into it (with compile, ``_inductor_int8`` then rebuilds it for
    inductor); with ``calibration``: the float model is loaded, then quantized on those images."""
    from app.engine import quantize

    if not cfg.device.startswith("cpu"):
        raise ValueError(f"{plan.name}: int8 runs on the CPU only, not on {cfg.device}")
    model = plan.builder() if plan.weights_path is not None else _network(plan)  # seeded
    if plan.calibration is None:
        quantize.use_quantized_engine()  # packs the weights for this engine while loading
    if plan.weights_path is not None:
        load_into(model, Path(plan.weights_path))
    model.eval()
    if plan.calibration is not None:
        model = _calibrated(model, plan, cfg)
    pre = plan.preprocess
    return NormalizingModel(model, pre.mean, pre.std, torch.float32, False)


def _calibrated(model: nn.Module, plan: LoadPlan, cfg: WorkerConfig) -> nn.Module:
    """Quantized on the calibration images: through PT2E where inductor will compile it (a
    graph ``_inductor_int8`` compiles), else, or where the model cannot be exported, with FX
    (eager int8 kernels)."""
    from app.engine import quantize

    folder = Path(plan.calibration or "")
    quantize.calibration_images(folder)  # a missing or empty folder fails here, once
    if cfg.compile and quantize.inductor_int8_available():
        try:
            return quantize.calibrate_pt2e(model, plan.preprocess, folder)
        except Exception as exc:  # not exportable (custom models): the eager FX path
            log.warning("%s: PT2E calibration failed, calibrating with FX: %s", plan.name, exc)
    return quantize.calibrate(model, plan.preprocess, folder)


class NormalizingModel(nn.Module):
    """The model with its input handling in front, so that torch.compile fuses them.

    uint8 pixels (what the service sends) are scaled to [0, 1] and normalised in float32, exactly
    as torchvision's transforms do, then cast to the model's precision and memory format. Float
    input is taken as already normalised.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        dtype: torch.dtype,
        channels_last: bool,
    ) -> None:
        super().__init__()
        self.model = model
        # a converted int8 model may hold no float parameters: it runs on the CPU
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1))
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = (x.to(torch.float32) / 255.0 - self.mean) / self.std
        x = x.to(dtype=self.dtype, memory_format=self.memory_format)
        return torch.softmax(self.model(x).float(), dim=1)


class Runner:
    """Runs batches for one worker's models; also usable in-process (benchmarks, tests)."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.precision]
        self.models: dict[str, nn.Module] = {}
        self.precisions: dict[str, str] = {}
        self.batch_sizes: dict[str, int] = {}  # measured at load with auto_batch
        self.backends: dict[str, str] = {}
        self.preprocess: dict[str, Preprocess] = {}
        self.plans: dict[str, LoadPlan] = {}
        self.explainers: dict[str, tuple[nn.Module, str]] = {}  # name -> (fp32 eager, layer)
        # name -> the checkpoint file as it was when the model was loaded (_file_identity)
        self.sources: dict[str, tuple[int, ...] | None] = {}
        self._decoder: Decoder | None = None

    def load(self, plan: LoadPlan) -> str:
        """Build, load and warm up one model; returns the backend that will run it."""
        _release(self.models.pop(plan.name, None))  # reloaded in place: the old graphs go first
        self.preprocess[plan.name] = plan.preprocess
        self.plans[plan.name] = plan
        self.explainers.pop(plan.name, None)
        self.sources[plan.name] = _file_identity(plan.weights_path)  # before it is read
        if self.cfg.runtime == "openvino" and self.device.type == "cpu" and self._openvino(plan):
            return self._finish_load(plan)
        precision = plan_precision(plan, self.cfg)
        eager = _build(plan, self.cfg)
        self.precisions[plan.name] = precision
        backend = "eager"
        if self.cfg.compile and _compilable(plan, precision, eager):
            # Compile time is absorbed here, before the model is reported ready. On the CPU:
            # one frozen graph per batch size (see Bucketed); float models on CUDA: dynamic
            # shapes, one graph serves every batch size. Any failure falls back to eager.
            compiled: nn.Module | None = None
            try:
                if precision == "int8":
                    compiled, graphs = _inductor_int8(
                        plan, eager, self.cfg.warmup_batch, self.cfg.cpp_wrapper
                    )
                elif _static_graphs(self.device):
                    sizes = batch_buckets(self.cfg.warmup_batch)
                    bucketed = Bucketed(eager, sizes, eager, self.cfg.cpp_wrapper)
                    compiled, graphs = bucketed, len(sizes)
                else:
                    compiled, graphs = cast(nn.Module, torch.compile(eager, dynamic=True)), 2
                _allow_compiled_graphs(graphs)
                self.models[plan.name] = compiled
                with _no_silent_eager():
                    self._warm_up(plan)
                if isinstance(compiled, Bucketed) and compiled.fell_back:
                    raise RuntimeError("the compiled graphs failed during the warm-up")
                backend = "inductor"
            except Exception as exc:
                log.warning("torch.compile failed for %s, serving eager: %s", plan.name, exc)
                if isinstance(compiled, Bucketed):
                    compiled.release()
        if backend == "eager":
            self.models[plan.name] = eager
            self._warm_up(plan)
        self.backends[plan.name] = backend
        return self._finish_load(plan)

    def _openvino(self, plan: LoadPlan) -> bool:
        """Serve ``plan`` on OpenVINO's CPU plugin (IMGCLS_CPU_RUNTIME=openvino); False, with
        the reason logged, where it cannot be converted or fails its warm-up: torch serves it."""
        from app.engine import openvino

        # fp32 weights in the usual layout: OpenVINO picks its own layout, and casts by the
        # hint; a calibrated int8 model through FX (compile off), whose eager ops it converts.
        # This model's errors (a checkpoint that does not load, calibration) are its own.
        source = _build(
            plan,
            dataclasses.replace(self.cfg, precision="fp32", channels_last=False, compile=False),
        )
        floats = openvino.float_precision(self.cfg.precision)
        threads = self.cfg.threads or torch.get_num_threads()
        precision = "int8" if plan_precision(plan, self.cfg) == "int8" else floats
        try:
            model = openvino.OpenVINOModel(source, plan.input_size, floats, threads)
            self.models[plan.name] = model
            self.precisions[plan.name] = precision
            self._warm_up(plan)
        except Exception as exc:
            log.warning("OpenVINO cannot serve %s, serving it with torch: %s", plan.name, exc)
            self.models.pop(plan.name, None)
            self.precisions.pop(plan.name, None)
            return False
        self.backends[plan.name] = "openvino"
        return True

    def _finish_load(self, plan: LoadPlan) -> str:
        """After the model is built and warm: its batch size (auto) and JPEG decoders."""
        try:
            if self.cfg.auto_batch:
                self._settle_batch(plan)
            if self.cfg.jpeg_on_device:
                self._pick_jpeg_decoder(plan)
        except Exception:  # the model itself failed: nothing of it stays
            self.unload(plan.name)
            raise
        return self.backends[plan.name]

    def _settle_batch(self, plan: LoadPlan) -> None:
        """Measure the batch size (``_measure_batch``); a ``Bucketed`` model then keeps only the
        graphs it needs (batches close at that size). If a graph compiled while measuring failed,
        the model is served eager from then on, and measured again as such."""
        best = self.batch_sizes[plan.name] = self._measure_batch(plan)
        model = self.models[plan.name]
        if not isinstance(model, Bucketed):
            return
        model.keep(best)
        if model.fell_back:  # its graphs were dropped when it fell back (Bucketed.forward)
            self.models[plan.name] = model.fallback
            self.backends[plan.name] = "eager"
            self.batch_sizes[plan.name] = self._measure_batch(plan)

    def _pick_jpeg_decoder(self, plan: LoadPlan) -> None:
        """Which decoder takes this model's plain JPEGs, per upload size: torchvision's (nvjpeg
        on CUDA) or Pillow, timed here (``Decoder.pick_by_size``; a CPU worker times fewer
        images: ~0.4 s per transform on 2 cores). If the timing fails, a CUDA worker sends every
        plain JPEG to nvjpeg and a CPU worker every upload to Pillow, as before it was timed."""
        cuda = self.device.type == "cuda"
        batch = min(self.cfg.warmup_batch, 16 if cuda else 4)
        try:
            picks = self.decoder().pick_by_size(plan.preprocess, batch, 3 if cuda else 2)
        except Exception as exc:
            log.warning("%s: JPEG decoders not timed: %s", plan.name, exc)
            return
        log.info("%s: JPEG decoder by size: %s", plan.name, picks)

    def jpeg_decode(self, name: str) -> dict[str, Any] | None:
        """The JPEG decoder by upload size for ``name``'s transform, where it was timed."""
        return self._decoder.timed(self.preprocess[name]) if self._decoder else None

    def _measure_batch(self, plan: LoadPlan) -> int:
        from app.engine import batchsize

        size = plan.input_size

        def run(bs: int) -> object:
            x = torch.zeros(bs, 3, size, size, dtype=torch.uint8)
            return self.forward(plan.name, x)

        measured = batchsize.pick(run, self.cfg.warmup_batch)
        log.info("%s: batch %d (images/s by size: %s)", plan.name, measured.best,
                 measured.images_per_s)  # fmt: skip
        return measured.best

    def unload(self, name: str) -> None:
        """Drop a model and give its memory back (the device's cache too)."""
        _release(self.models.pop(name, None))
        self.backends.pop(name, None)
        self.precisions.pop(name, None)
        self.batch_sizes.pop(name, None)
        self.preprocess.pop(name, None)
        self.plans.pop(name, None)
        self.explainers.pop(name, None)
        self.sources.pop(name, None)
        collect()  # the frozen objects too (memory.settle, at load)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _warm_up(self, plan: LoadPlan) -> None:
        # The first passes allocate, pick kernels and (with compile) compile, on the input the
        # service sends: uint8 pixels.
        model = self.models[plan.name]
        sizes: tuple[int, ...] = (1, 2, self.cfg.warmup_batch)
        if isinstance(model, Bucketed):  # one graph per size; with auto, the sizes measured
            sizes = model.sizes[:1] if self.cfg.auto_batch else model.sizes  # compile theirs
        for bs in sorted(set(sizes)):
            x = torch.zeros(bs, 3, plan.input_size, plan.input_size, dtype=torch.uint8)
            out = self.forward(plan.name, x)
            if out.shape != (bs, plan.num_classes):
                raise RuntimeError(
                    f"{plan.name} outputs {tuple(out.shape)}, expected {(bs, plan.num_classes)}"
                )

    def forward(self, name: str, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (float32, on the CPU) for a batch of uint8 pixels (N, 3, S, S)
        or of already normalised float images."""
        model = self.models[name]
        try:
            out = self._forward(model, batch)
            if isinstance(model, Bucketed) and model.fell_back:
                self.backends[name] = "eager"  # what ran, in this and every later answer
            return out
        except torch.cuda.OutOfMemoryError:
            if batch.shape[0] == 1:
                raise
            torch.cuda.empty_cache()
            half = batch.shape[0] // 2  # split the batch and retry each half
            return torch.cat([self.forward(name, batch[:half]), self.forward(name, batch[half:])])

    def decoder(self) -> Decoder:
        """The uploads' decoder (IMGCLS_DECODE=worker), made on first use."""
        if self._decoder is None:
            cfg = self.cfg
            self._decoder = Decoder(
                cfg.decode_threads or cfg.threads or torch.get_num_threads(),
                cfg.max_pixels, cfg.device,
                cfg.jpeg_on_device, cfg.jpeg_draft,
            )  # fmt: skip
        return self._decoder

    def prepare(self, name: str, items: list[Encoded | torch.Tensor]) -> Prepared:
        """Decode and resize a batch of uploads for ``name`` (IMGCLS_DECODE=worker)."""
        return self.decoder().prepare(items, self.preprocess[name])

    def explainer(self, name: str) -> tuple[nn.Module, str]:
        """The fp32 eager copy of ``name`` that explanations run on, and its Grad-CAM layer.

        Built on the first explanation from the model's own LoadPlan (builder and checkpoint,
        or the same random weights, ``_network``):
        Grad-CAM needs gradients, which the compiled or bf16 inference model cannot give (and
        bf16 gradients would make coarse maps). Workers that never explain never pay for it.
        """
        cached = self.explainers.get(name)
        if cached is None:
            from app.engine.explain import default_cam_layer

            plan = self.plans[name]
            if plan.weights_path is not None and (
                _file_identity(plan.weights_path) != self.sources.get(name)
            ):  # explained with other weights than it serves with, or not at all: refused
                raise CheckpointChangedError(
                    f"the checkpoint {name} was loaded from ({plan.weights_path}) is gone or "
                    "was replaced since; its explanations need that file: load the model again "
                    "(a restart, or the repository API's unload and load)"
                )
            model = _network(plan)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            model = model.to(device=self.device, dtype=torch.float32)
            layer = plan.cam_layer or default_cam_layer(plan.arch, model, plan.input_size)
            cached = self.explainers[name] = (model, layer)
        return cached

    def explain(self, name: str, pixels: torch.Tensor, target: int | None) -> tuple[Any, ...]:
        """Grad-CAM of uint8 pixels (N, 3, S, S) for ``target`` (None: each image's top-1):
        heatmaps (numpy float32), targets, scores, and one overlay PNG per image."""
        from app.engine.explain import explain, overlay_png

        if name not in self.models:
            raise KeyError(f"model {name!r} is not loaded on this worker")
        model, layer = self.explainer(name)
        pre = self.preprocess[name]
        x = normalize(pixels.to(self.device), pre.mean, pre.std)
        out = explain(model, x, layer, target)
        overlays = [overlay_png(pixels[i], out.heatmaps[i]) for i in range(pixels.shape[0])]
        return out.heatmaps.numpy(), out.targets.numpy(), out.scores.numpy(), overlays

    def _forward(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.device.type == "cuda" and not batch.is_cuda:
                x = batch.pin_memory() if not batch.is_pinned() else batch
                x = x.to(self.device, non_blocking=True)
            else:
                x = batch
            return model(x).cpu()


def _release(model: nn.Module | None) -> None:
    """Free what a served model holds outside its parameters: compiled graphs (``Bucketed``)
    or OpenVINO's compiled models."""
    from app.engine.openvino import OpenVINOModel

    if isinstance(model, Bucketed | OpenVINOModel):
        model.release()


# Graphs compiled in this process's life, by every Runner, for unloaded models too: dynamo's
# caches are per process and keep their graphs.
_COMPILED_GRAPHS = 0


def _allow_compiled_graphs(graphs: int) -> None:
    """Make room for ``graphs`` more compiled graphs in this process.

    Float models compiled with dynamic shapes (on CUDA) run through the same code
    (``NormalizingModel.forward``), and dynamo caches at most ``recompile_limit`` graphs per
    code object (8 by default): two per such model (batch 1 is specialised, the rest share one
    dynamic graph), and ``accumulated_recompile_limit`` in all. Past them it silently runs the
    frame eagerly: the fifth compiled model on a worker did, while reported as inductor. Graphs
    of unloaded models stay cached and keep counting, so the room follows every load in the
    process's life; the shapes served are fixed by the service, so there is no recompile storm
    to guard against. (``Bucketed`` graphs, on the CPU, run through code of their own, one per
    batch size, dropped on unload; they are counted too, which only leaves more room.)"""
    global _COMPILED_GRAPHS
    _COMPILED_GRAPHS += graphs
    config = torch._dynamo.config
    need = 2 * _COMPILED_GRAPHS + 8
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(config, name):  # set only where this torch has it (the device runs 2.11)
            setattr(config, name, max(getattr(config, name), need))


def _compilable(plan: LoadPlan, precision: str, eager: nn.Module) -> bool:
    """Float models compile everywhere; int8 where torchao's PT2E quantizer is installed, on
    the CPU: published weights, and calibrated models that were calibrated through PT2E (those
    calibrated with FX run its eager kernels)."""
    if precision != "int8":
        return True
    from app.engine import quantize

    if plan.calibration is not None:
        assert isinstance(eager, NormalizingModel)
        if not quantize.is_pt2e(eager.model):
            log.info("%s: calibrated int8 (FX) runs eagerly", plan.name)
            return False
        return True
    if not quantize.inductor_int8_available():
        log.warning("%s: torchao's PT2E quantizer is not importable: int8 runs eagerly", plan.name)
        return False
    return True


class Bucketed(nn.Module):
    """A model compiled for a few fixed batch sizes (``batch_buckets``), each a graph of its own
    with frozen weights (``_frozen``). A batch runs as the next compiled size, zero-padded, where
    that wastes at most a quarter of it; otherwise it is split: the largest compiled size that
    fits, then the rest the same way (9 runs as 8 + 1, not as 16). The eager model answers
    instead, from then on, if a compiled graph fails.

    Why fixed sizes: oneDNN's convolutions compiled for one batch size, on weights packed for
    it, ran much faster than one dynamic graph (resnet50 on a 2-core AMD EPYC, same script:
    int8 95 vs 55 images/s at batch 8; bf16 48.5 vs 43.8 at batch 8 and 40.4 vs 25.7 at
    batch 1; docs/PERFORMANCE.md). The price is memory: each size's graph holds its own packed
    copy of the weights, so the sizes above the batch size a model settles on are dropped
    (``keep``).

    Every batch is copied into a tensor made here, so that the compiled graphs always see the
    same kind of tensor (one made in inference mode): a guard on the tensor's kind failing
    would recompile while serving (frozen, but seconds long)."""

    def __init__(
        self,
        model: nn.Module,
        sizes: tuple[int, ...],
        fallback: nn.Module,
        cpp_wrapper: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.sizes = sizes
        self.fallback = fallback
        self.fell_back = False
        self._graphs = {size: _Graph(model, cpp_wrapper) for size in sizes}

    @property
    def generated(self) -> list[Any]:
        """Inductor's modules made for this model, every size (see ``_Graph.release``)."""
        return [m for graph in self._graphs.values() for m in graph.generated]

    def keep(self, largest: int) -> None:
        """Drop the graphs of the sizes above ``largest`` (and their copies of the weights);
        a larger batch, if one ever comes, is split into the sizes kept."""
        kept = tuple(s for s in self.sizes if s <= largest) or self.sizes[:1]
        for size in self.sizes:
            if size not in kept:
                self._graphs.pop(size).release()
        self.sizes = kept

    def release(self) -> None:
        """Drop every compiled graph of this model (on unload, or when compiling failed)."""
        for graph in self._graphs.values():
            graph.release()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fell_back:
            return self.fallback(x)
        try:
            pieces = self._plan(x.shape[0])
            return torch.cat([self._run(x[i : i + n], size) for i, n, size in pieces])
        except Exception as exc:
            log.warning("a compiled graph failed, serving eager from now on: %s", exc)
            self.fell_back = True
            self.release()  # the graphs (and their copies of the weights) serve no more
            collect()  # frozen at load with the rest (memory.settle): reclaimed now
            return self.fallback(x)

    def _plan(self, n: int) -> list[tuple[int, int, int]]:
        """(start, rows, compiled size) of the pieces a batch of ``n`` runs as."""
        pieces, start = [], 0
        while n > 0:
            size = next((s for s in self.sizes if s >= n), self.sizes[-1])
            take = min(n, size)
            if take * 4 < size * 3:  # padding would waste more than a quarter: split
                take = size = max(s for s in self.sizes if s <= n)
            pieces.append((start, take, size))
            start, n = start + take, n - take
        return pieces

    def _run(self, x: torch.Tensor, size: int) -> torch.Tensor:
        n = x.shape[0]
        padded = x.new_empty((size, *x.shape[1:]))
        padded[:n] = x
        padded[n:] = 0
        return self._graphs[size](padded)[:n]


class _Graph:
    """One batch size's compiled graph, through a function with a code object of its own:
    dynamo caches graphs per code object, and a frozen graph holds its own copy of the weights,
    so each size can be dropped alone (``release``; the shared ``NormalizingModel.forward``
    would keep them for the process's life: ~115 MB per reload of resnet50:int8). fullgraph: a
    graph break would make code objects that are not its own; it fails instead.

    Every call runs with freezing on (``_frozen``; ~25 µs) and notes the modules inductor made,
    so that any compile is frozen and freed with the graph: uint8 pixels compile in the warm-up
    (or in the batch-size measurement), float32 (already normalised: /v2's PIXELS) on the first
    such batch of each size, during that batch (seconds, as the dynamic graph's recompile did),
    and another copy of the weights. One caller at a time (the worker's main thread; Ray runs
    one batch at a time).

    ``cpp_wrapper`` (IMGCLS_CPP_WRAPPER): inductor writes the code that calls the graph's
    kernels (oneDNN's ~50 convolutions of a resnet50, its own fused loops) as C++ compiled with
    them, instead of Python. The same kernels run; what goes is Python's cost per call:
    resnet50 at batch 8 on a 2-core AMD EPYC (bench/cpp_wrapper.py, both graphs in one process
    called in turn), bf16 1.6-3.4% and int8 0.9-4.7% less time per batch (nine runs in all),
    1-7 ms of the 6-15 ms a pass spends outside oneDNN's convolutions, for a load and compile
    1.6-2.3x as long. Off by default for that reason (docs/PERFORMANCE.md)."""

    def __init__(self, model: nn.Module, cpp_wrapper: bool = False) -> None:
        self._code = _own_code_run(model)
        self._compiled = torch.compile(self._code, dynamic=False, fullgraph=True)
        self._cpp_wrapper = cpp_wrapper
        self.generated: list[Any] = []  # inductor's modules made for this graph (see release)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        known = len(_inductor_modules())
        try:
            with _frozen(self._cpp_wrapper):
                return self._compiled(x)
        finally:
            made = _inductor_modules()
            if len(made) > known:  # it compiled
                self.generated += made[known:]

    def release(self) -> None:
        """Drop this graph: dynamo's cache entries for its code, and the modules inductor
        generated for it, which hold the frozen weights as attributes and which inductor's
        module cache would otherwise keep for the process's life."""
        try:
            torch._dynamo.reset_code(self._code.__code__)
            loaded = _inductor_modules()
            for generated in self.generated:
                if generated in loaded:
                    loaded.remove(generated)
                name = getattr(generated, "__name__", "")
                if sys.modules.get(name) is generated:
                    del sys.modules[name]
        except Exception as exc:  # torch internals: at worst memory stays, the worker lives
            log.warning("could not free a compiled graph: %s", exc)
        self.generated = []


def _static_graphs(device: torch.device) -> bool:
    """Float models on the CPU compile as ``Bucketed`` frozen graphs, one per batch size; on
    CUDA they keep one dynamic graph (not yet measured against fixed sizes on a GPU)."""
    return device.type == "cpu"


def _inductor_modules() -> list[Any]:
    """The list in which inductor keeps every generated module it loaded (with attributes),
    or an empty one where this torch keeps none there."""
    try:
        from torch._inductor.codecache import PyCodeCache
    except ImportError:
        return []
    modules = getattr(PyCodeCache, "modules", None)
    return modules if isinstance(modules, list) else []


def _own_code_run(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    run.__code__ = run.__code__.replace()  # a copy: a code object (and dynamo cache) of its own
    return run


def batch_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``largest``, and ``largest``."""
    sizes = [1]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    if largest > 1:
        sizes.append(largest)
    return tuple(sizes)


def _inductor_int8(
    plan: LoadPlan, eager: nn.Module, largest: int, cpp_wrapper: bool = False
) -> tuple[nn.Module, int]:
    """The int8 model as a PT2E graph (published weights: rebuilt here; calibrated: as it was
    calibrated), compiled by inductor for each batch size in ``batch_buckets(largest)``;
    returns it and the number of graphs.

    Static shapes, because oneDNN's int8 convolutions compiled for a dynamic batch ran at 58% of
    the static ones (resnet50, batch 8, AMD EPYC, one script: 55 vs 95 images/s). Channels-last
    input, as oneDNN wants. ``eager`` answers if the compiled model ever fails."""
    from app.engine import quantize

    assert isinstance(eager, NormalizingModel)
    pre = plan.preprocess
    if plan.calibration is not None:  # eager runs the same graph, emulating int8 in float
        graph = eager.model
    else:
        graph = quantize.published_pt2e(plan.arch, eager.model, plan.input_size)
    model = NormalizingModel(graph, pre.mean, pre.std, torch.float32, True)
    sizes = batch_buckets(largest)
    return Bucketed(model, sizes, eager, cpp_wrapper), len(sizes)


def _frozen(cpp_wrapper: bool = False) -> Any:
    """Inductor's freezing (weights as constants, pre-packed for oneDNN) while a ``Bucketed``
    graph compiles: PT2E's int8 convolutions are lowered to oneDNN only on frozen weights
    (without it resnet50 int8 ran 19 images/s), and float convolutions run on weights packed
    once instead of at every call. It takes effect only while dynamo traces, hence around each
    graph's compiling call (``_Graph``); so does ``cpp_wrapper`` (see ``_Graph``; when off,
    torch's own default stands: TORCHINDUCTOR_CPP_WRAPPER)."""
    if cpp_wrapper:
        return torch._inductor.config.patch(freezing=True, cpp_wrapper=True)
    return torch._inductor.config.patch(freezing=True)


def _no_silent_eager() -> Any:
    """During warm-up, a model that dynamo would run eagerly past its recompile limit fails
    instead, so that it is reported (and served) as eager rather than as inductor."""
    config = torch._dynamo.config
    if not hasattr(config, "fail_on_recompile_limit_hit"):  # older torch: nothing to patch
        return contextlib.nullcontext()
    return config.patch(fail_on_recompile_limit_hit=True)


def _heartbeat(outbox: Any, api: Any, forked_by: int) -> None:
    """Tell the pool this process is alive, whatever its main thread is doing. A process that is
    stopped, or stuck where no Python thread runs, falls silent and the watchdog restarts it.

    And end this process when the API process that started it is gone (killed with SIGKILL,
    or by the OOM killer): the worker would otherwise live on, an orphan holding its models'
    memory (a GPU's too), beside the workers of the service started again. ``api`` is
    multiprocessing's handle on the API process, watched through a pipe that the API process
    holds open (its death closes it, whether or not it was reaped; a pid could be reused). A
    worker whose parent changed ends too: forked, its parent is the fork server, through which
    the pool learns its workers' exit; with the server gone the pool counts the worker dead and
    starts another."""
    while True:
        if os.getppid() != forked_by or (api is not None and not api.is_alive()):
            os._exit(1)
        outbox.put(("heartbeat", time.monotonic()))
        time.sleep(HEARTBEAT_S)


def _load(runner: Runner, plan: LoadPlan, cfg: WorkerConfig, outbox: Any) -> None:
    outbox.put(("status", plan.name, "loading", None, None))
    try:
        backend = runner.load(plan)
    except Exception as exc:
        settle()
        outbox.put(("status", plan.name, "failed", f"{type(exc).__name__}: {exc}", None))
        return
    settle()  # no full collection walks the compiled model's objects while it serves
    info = {
        "precision": runner.precisions[plan.name],
        "backend": backend,
        "batch_size": runner.batch_sizes.get(plan.name),
        "jpeg_decode": runner.jpeg_decode(plan.name),
    }
    outbox.put(("status", plan.name, "ready", None, info))


def _run_batch(runner: Runner, cfg: WorkerConfig, batch_id: int, name: str, batch: Any) -> tuple:
    start = time.monotonic()
    if name not in runner.models:
        raise KeyError(f"model {name!r} is not loaded on this worker")
    items = None
    if isinstance(batch, list):  # uploads: decode and resize here
        prepared = runner.prepare(name, batch)
        items = (prepared.rows, prepared.errors, prepared.decode_ms, prepared.preprocess_ms)
        batch = prepared.batch
    t0 = time.monotonic()
    # batch is None when no upload in it could be decoded
    probs = torch.empty(0, 0) if batch is None else runner.forward(name, batch)
    ms = (time.monotonic() - t0) * 1000.0
    memory = torch.cuda.memory_allocated(runner.device) if runner.device.type == "cuda" else 0
    ran = (runner.precisions[name], runner.backends[name], memory)
    return ("result", batch_id, probs.numpy(), start, ms, ran, items)


def worker_main(cfg: WorkerConfig, inbox: Any, outbox: Any) -> None:
    """Entry point of a worker process."""
    forked_by = os.getppid()  # the API process, or the fork server: read before anything else
    if cfg.log_level is not None:  # a new process: nothing of the API process's logging set up
        from app.observability import configure_logging

        configure_logging(cfg.log_level, cfg.log_format)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(cfg.device))
        torch.backends.cudnn.benchmark = True
    # Ctrl-C in a terminal, systemd's default stop and `kill -- -PGID` signal the whole process
    # group: the API process drains and then stops its workers itself (a worker killed by the
    # signal failed its batches with 503 and was restarted during the shutdown).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if cfg.start_method == "forkserver" and "app.engine.forkserver" not in sys.modules:
        log.warning(
            "multiprocessing's fork server could not import app.engine.forkserver: each worker "
            "imports torch itself, and a SIGTERM to the process group ends the server"
        )
    _progress_bars_lock_threads_only()
    started_by = multiprocessing.parent_process()  # None when not started as a process
    threading.Thread(
        target=_heartbeat, args=(outbox, started_by, forked_by), daemon=True, name="heartbeat"
    ).start()
    outbox.put(("started", os.getpid()))
    runner = Runner(cfg)
    for plan in cfg.plans:
        _load(runner, plan, cfg, outbox)

    while True:
        msg = inbox.get()
        if msg is None:
            break
        kind = msg[0]
        if kind == "load":
            _load(runner, msg[1], cfg, outbox)
            continue
        if kind == "unload":
            runner.unload(msg[1])
            outbox.put(("status", msg[1], "unloaded", None, None))
            continue
        if kind == "explain":
            _answer(outbox, "explanation", msg, functools.partial(_run_explain, runner, msg))
        else:
            _answer(outbox, "batch", msg, functools.partial(_run_batch, runner, cfg, *msg[1:]))
        del msg  # the batch's shared memory goes as soon as it is answered


def _progress_bars_lock_threads_only() -> None:
    """torch.fx's interpreter makes a (disabled) tqdm progress bar for each graph that inductor
    compiles, and tqdm's first bar makes a multiprocessing RLock. In a worker that lock is a
    named semaphore registered with the API process's resource tracker (the fork server and
    spawn pass the tracker on): a worker killed (the watchdog, a crash, a stop past its grace)
    never unregisters it, and when the service stops the tracker prints a plain-text warning
    of "leaked semaphore objects" to the service's stderr. A worker's bars are never shown and
    it runs no processes of its own that could share them: a thread lock is all they need."""
    try:
        from tqdm import tqdm
    except ImportError:  # torch.hub's stand-in then, which makes no lock
        return
    tqdm.set_lock(threading.RLock())


def _run_explain(runner: Runner, msg: tuple[Any, ...]) -> tuple[Any, ...]:
    _, batch_id, name, pixels, target = msg
    start = time.monotonic()
    heatmaps, targets, scores, overlays = runner.explain(name, pixels, target)
    ms = (time.monotonic() - start) * 1000.0
    return ("explained", batch_id, heatmaps, targets, scores, overlays, start, ms)


def _answer(
    outbox: Any, what: str, msg: tuple[Any, ...], run: Callable[[], tuple[Any, ...]]
) -> None:
    """Run one job and put its answer, or the error that failed it, in the outbox."""
    batch_id, name = msg[1], msg[2]
    try:
        outbox.put(run())
    except CheckpointChangedError as exc:  # not a fault of the model: the service says why
        log.warning("%s %s for %s refused: %s", what, batch_id, name, exc)
        outbox.put(("error", batch_id, str(exc), "unavailable"))
    except Exception as exc:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        log.error("%s %s for %s failed: %s", what, batch_id, name, detail)
        outbox.put(("error", batch_id, detail, "failed"))
