"""int8 models on the CPU: torchvision's published quantized ResNets, and opt-in post-training
quantization calibrated on images the operator provides.

int8 is where CPUs without AMX gain most (resnet50 on a 2-core AMD EPYC with VNNI: ~2.7x bf16),
but only where it is honest: published weights come with their own reference accuracy, and
models quantized here pass an accuracy guard on real images (tests/test_int8.py).

Where inductor compiles (``IMGCLS_COMPILE``, on by default on CPUs), both run as PT2E graphs
compiled by inductor (torchao's X86InductorQuantizer, which torch 2.14 no longer ships in
``torch.ao``): the published weights rebuilt as one (``published_pt2e``, below), calibrated
models quantized through one (``calibrate_pt2e``). Otherwise post-training quantization uses FX
graph mode (``torch.ao.quantization.quantize_fx``) with the x86 engine and runs eagerly on
fbgemm/oneDNN int8 kernels; the guard (tests/test_int8.py) holds both. FX traces through the
CIFAR ResNets' option-A shortcuts (strided slice and zero channel padding, no parameters): the
slice and pad run on the quantized tensor and the residual sum becomes a quantized ``add_relu``.
Both ways, convolutions narrower than 32 channels and the last linear layer stay in float32: few
accumulation terms leave int8 rounding little to average out, and they held most of the error on
the CIFAR ResNets (16-channel first stage): with FX, the worst top-1 agreement with fp32 on the
guard's 500 images rose from 97.6% (resnet44, only the first convolution and the last layer in
float) to 98.4%; all four pass at 98.4-98.8% (FX) and 98.8-99.6% (PT2E) with VNNI, 98.0-98.4%
(FX) and 98.0-99.6% (PT2E) on plain AVX2, whose weights are 7-bit (``_weight_range``). ImageNet
ResNets keep only their first convolution (3 input channels) in float. Activation ranges are
min/max (histogram observers were slower to calibrate and no more accurate here).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.engine.fastpath import cpu_features
from app.preprocess import Preprocess, normalize

log = logging.getLogger("imgcls.quantize")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_CALIBRATION_IMAGES = 512
CALIBRATION_MAX_PIXELS = 200_000_000  # the operator's own files: only a sanity bound
CALIBRATION_BATCH = 64


def quantized_engine() -> str:
    """The x86 engine (fbgemm or oneDNN per operator, by the CPU) where torch has it."""
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm"):
        if name in engines:
            return name
    raise RuntimeError(f"no x86 int8 engine in this torch build (engines: {engines})")


def use_quantized_engine() -> str:
    engine = quantized_engine()
    torch.backends.quantized.engine = engine
    return engine


def published_int8(arch: str) -> nn.Module:
    """torchvision's quantizable ``arch``, fused, prepared and converted as with
    ``quantize=True``, ready for the published int8 state_dict (loaded by the worker).

    The layout follows the weights' fbgemm qconfig; the weights are packed for the x86 engine
    when the state_dict is loaded, so the engine is switched before that.
    """
    module = importlib.import_module("torchvision.models.quantization")
    model: nn.Module = getattr(module, arch)(weights=None, quantize=True, backend="fbgemm")
    use_quantized_engine()
    return model.eval()


def published_builder(arch: str) -> functools.partial[nn.Module]:
    """A picklable builder for the worker process."""
    return functools.partial(published_int8, arch)


def calibration_images(folder: Path, limit: int = MAX_CALIBRATION_IMAGES) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted): the first ``limit``."""
    if not folder.is_dir():
        raise ValueError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(
            f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files[:limit]


def _weight_range() -> tuple[int, int]:
    """The int8 weights' range: 7 bits where int8 dot products could saturate (plain AVX2
    without VNNI sums two uint8 x int8 products in 16 bits: 2 x 255 x 64 < 2**15 always fits;
    FX's conversion may round a channel's largest weight to 64, PT2E's clamps it to 63),
    the full 8 bits elsewhere. Activations keep their 8 bits either way: 7-bit activations (the
    ``reduce_range`` of torch's default x86 configuration) cost more accuracy on the guard's
    images (FX top-1 agreement 96.4-97.6% on an AVX2-only AMD EPYC) than 7-bit per-channel
    weights do."""
    return (-64, 63) if not cpu_features().vnni else (-128, 127)


NARROW = 32


def _float_modules(model: nn.Module) -> list[str]:
    """Convolutions narrower than NARROW channels and the last linear layer (kept in float32)."""
    narrow = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and min(m.in_channels, m.out_channels) < NARROW
    ]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [*narrow, *linears[-1:]]


def _calibration_batches(pre: Preprocess, folder: Path) -> Iterator[torch.Tensor]:
    """The images in ``folder``, normalised, in batches: decoded as uploads are (EXIF
    orientation, transparency on white; ``imaging.decode``) and resized by the exact path."""
    from app.engine.decoding import decode_pixels

    files = calibration_images(folder)
    for i in range(0, len(files), CALIBRATION_BATCH):
        chunk = files[i : i + CALIBRATION_BATCH]
        found = [decode_pixels(f.read_bytes(), CALIBRATION_MAX_PIXELS, {0: pre}) for f in chunk]
        pixels = torch.stack([by_key[0] for by_key, _, _ in found])
        yield normalize(pixels, pre.mean, pre.std)


def calibrate(model: nn.Module, pre: Preprocess, folder: Path) -> nn.Module:
    """Post-training int8 quantization of a float model (eval mode, on the CPU), calibrated on
    the images in ``folder`` preprocessed as for serving. The result takes normalised float32.
    FX graph mode, run eagerly on fbgemm/oneDNN kernels: where inductor compiles, the worker
    calibrates through ``calibrate_pt2e`` instead."""
    from torch.ao.quantization import (
        MinMaxObserver,
        PerChannelMinMaxObserver,
        QConfig,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = use_quantized_engine()
    low, high = _weight_range()
    qconfig = QConfig(
        activation=MinMaxObserver.with_args(reduce_range=False),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=low, quant_max=high
        ),
    )
    mapping = get_default_qconfig_mapping(engine).set_global(qconfig)
    for name in _float_modules(model):
        mapping.set_module_name(name, None)
    size = pre.output_size
    example = (torch.zeros(1, 3, size, size),)
    prepared = prepare_fx(model.eval(), mapping, example)
    with torch.no_grad():  # observers keep state across batches: not inference tensors
        for batch in _calibration_batches(pre, folder):
            prepared(batch)
    log.info("calibrated int8 (FX) on images from %s (%s engine)", folder, engine)
    converted = convert_fx(prepared).eval()
    _forget_modules()
    return converted


PT2E_MARK = "imgcls.pt2e"  # in a GraphModule's meta: a converted PT2E graph, for inductor


def calibrate_pt2e(model: nn.Module, pre: Preprocess, folder: Path) -> nn.Module:
    """The same post-training quantization as ``calibrate`` through PT2E (torchao's
    X86InductorQuantizer), for inductor to compile: batch norm folded, the same layers kept in
    float (``_float_modules``), per-channel symmetric int8 weights, activations by their
    min/max over the calibration images. Returns the converted graph (normalised float32 in,
    any batch size); run as it is, it computes the int8 numbers in float (slowly), compiled with
    freezing it runs oneDNN's int8 kernels. On the real CIFAR-10 ResNets the compiled graph
    agrees with fp32 on 494-498 of the guard's 500 images with VNNI (FX: 492-494), 490-498 on
    plain AVX2 with its 7-bit weights (FX: 490-492)."""
    import dataclasses

    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    graph = _unshared(model.eval())
    size = pre.output_size
    example = (torch.zeros(2, 3, size, size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(graph, example, dynamic_shapes=({0: batch},)).module()
    config = x86.get_default_x86_inductor_quantization_config(reduce_range=False)
    # min/max, as the FX path: the default histogram observer searched ~50 s per model here
    activation = dataclasses.replace(
        config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver
    )
    low, high = _weight_range()
    assert config.weight is not None
    weight = dataclasses.replace(config.weight, quant_min=low, quant_max=high)
    config = dataclasses.replace(
        config, input_activation=activation, output_activation=activation, weight=weight
    )
    quantizer = x86.X86InductorQuantizer().set_global(config)
    for name in _float_modules(graph):
        quantizer.set_module_name_qconfig(name, None)
    try:
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for images in _calibration_batches(pre, folder):
                prepared(images)
        converted: torch.fx.GraphModule = convert_pt2e(prepared)
    finally:
        _forget_modules()
    converted.meta[PT2E_MARK] = True
    log.info("calibrated int8 (PT2E) on images from %s", folder)
    return converted


def is_pt2e(model: nn.Module) -> bool:
    return isinstance(model, torch.fx.GraphModule) and bool(model.meta.get(PT2E_MARK))


# --- Published int8 weights, compiled by inductor (PT2E) ------------------------------------
#
# torchvision's quantized ResNets run eagerly on fbgemm/oneDNN kernels, each convolution a call
# with its own quantize and dequantize around it. The same weights and activation ranges as a PT2E
# graph (torchao's X86InductorQuantizer) compile to oneDNN int8 convolutions with their
# requantization, ReLU and residual addition fused: resnet50 on a 2-core AMD EPYC with VNNI ran
# 75.9 -> 90.0 images/s at its best batch (docs/PERFORMANCE.md). Nothing is recalibrated: every
# weight keeps its published int8 value and scale, every activation its published scale and zero
# point.

_PASS_THROUGH = {
    "relu", "relu_", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "flatten", "view",
    "reshape", "getitem",
}  # fmt: skip


def inductor_int8_available() -> bool:
    """torchao's PT2E quantization (where torch's own X86InductorQuantizer went)."""
    try:
        importlib.import_module("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    except Exception:  # not installed, or built for another torch
        return False
    return True


def _unshared(model: nn.Module) -> torch.fx.GraphModule:
    """The model as an fx graph with batch norm folded and every module called once: a module
    called twice (torchvision's ReLUs) would make one quantization partition with two outputs,
    which the x86 quantizer refuses."""
    import collections
    import copy

    from torch.fx.experimental.optimization import fuse

    graph_module = fuse(model)
    assert isinstance(graph_module, torch.fx.GraphModule)
    calls: collections.Counter[str] = collections.Counter()
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            target = str(node.target)
            calls[target] += 1
            if calls[target] > 1:
                name = f"{target.replace('.', '_')}_call{calls[target]}"
                graph_module.add_submodule(name, copy.deepcopy(graph_module.get_submodule(target)))
                node.target = name
    graph_module.recompile()
    return torch.fx.symbolic_trace(graph_module)  # fresh node metadata for the renamed calls


def _weight_of(node: torch.fx.Node) -> str:
    """The module name of a convolution or linear node's weight (through its observer)."""
    weight = node.args[1]
    assert isinstance(weight, torch.fx.Node)
    if weight.op == "call_module":  # the weight's observer
        weight = weight.args[0]
    assert isinstance(weight, torch.fx.Node) and weight.op == "get_attr", weight
    return str(weight.target).rsplit(".", 1)[0]


def _op(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _through(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose values ``node`` carries unchanged in quantization terms: past observers,
    pooling, flattening and ReLUs (they keep the quantization of what they read)."""
    while node.op == "call_module" or (node.op != "placeholder" and _op(node) in _PASS_THROUGH):
        node = node.args[0]  # type: ignore[assignment]
    return node


def _published_key(node: torch.fx.Node, state: dict[str, Any]) -> str:
    """The module of torchvision's quantized ResNet whose output quantization holds the values
    of ``node``: ``quant`` for the input, a convolution by its name (its ReLU fused into it), a
    residual sum by its block's ``skip_add_relu`` (``add_relu`` in a BasicBlock); pooling,
    flattening and ReLUs keep the quantization of what they read, as in the quantized model."""
    node = _through(node)
    if node.op == "placeholder":
        return "quant"
    op = _op(node)
    if op in ("conv2d", "linear"):
        return _weight_of(node)
    if op in ("add", "add_"):  # the block's last convolution names the block
        for arg in node.args:
            source = _through(arg) if isinstance(arg, torch.fx.Node) else None
            if source is not None and source.op != "placeholder" and _op(source) == "conv2d":
                conv = _weight_of(source)
                if ".downsample." not in conv:
                    block = conv.rsplit(".", 1)[0]  # Bottleneck / BasicBlock
                    for key in (f"{block}.skip_add_relu", f"{block}.add_relu"):
                        if f"{key}.scale" in state:
                            return key
    raise ValueError(f"no published quantization for {node.op} {node.target}")


def _published_weight(state: dict[str, Any], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A published layer's int8 weight and float bias (a quantized Linear keeps them packed)."""
    if f"{key}.weight" in state:
        weight, bias = state[f"{key}.weight"], state[f"{key}.bias"]
    else:
        weight, bias = state[f"{key}._packed_params._packed_params"]
    assert isinstance(weight, torch.Tensor) and weight.is_quantized
    assert isinstance(bias, torch.Tensor)
    return weight, bias


def _weight_scales(state: dict[str, Any], key: str) -> torch.Tensor:
    """Per output channel scales of a published int8 weight (symmetric: zero points 0)."""
    weight, _ = _published_weight(state, key)
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        if bool((weight.q_per_channel_zero_points() != 0).any()):
            raise ValueError(f"{key}: asymmetric int8 weights")
        return weight.q_per_channel_scales().float()
    if weight.q_zero_point() != 0:
        raise ValueError(f"{key}: asymmetric int8 weights")
    return torch.full((weight.shape[0],), float(weight.q_scale()))


def _float_weights(model: nn.Module, state: dict[str, Any]) -> None:
    """The published int8 weights, dequantized (exactly int8 x scale), into the folded model."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, nn.Conv2d | nn.Linear):
                continue
            weight, bias = _published_weight(state, name)
            module.weight.copy_(weight.dequantize())
            assert module.bias is not None
            module.bias.copy_(bias)


def published_pt2e(arch: str, quantized: nn.Module, input_size: int) -> nn.Module:
    """torchvision's quantized ``arch`` (published weights loaded) as a converted PT2E graph
    for inductor, on normalised float input of any batch size. Raises ValueError where the
    graph has a quantization point the published model has no figures for."""
    import torchvision
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    state = quantized.state_dict()
    model = _unshared(getattr(torchvision.models, arch)(weights=None).eval())
    _float_weights(model, state)
    example = (torch.zeros(2, 3, input_size, input_size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(model, example, dynamic_shapes=({0: batch},)).module()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    try:
        prepared = prepare_pt2e(exported, quantizer)
        _publish_numbers(prepared, state)
        converted: nn.Module = convert_pt2e(prepared)
        return converted
    finally:
        _forget_modules()


def _publish_numbers(prepared: torch.fx.GraphModule, state: dict[str, Any]) -> None:
    """The published scales and zero points into the prepared graph's observers."""
    from torchao.quantization.pt2e.observer import FixedQParamsObserver

    for node in prepared.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("activation_post_process"):
            continue
        observer: Any = prepared.get_submodule(str(node.target))
        qmin, qmax = int(observer.quant_min), int(observer.quant_max)
        source = node.args[0]
        if source.op == "get_attr":  # a weight: symmetric per channel, as published
            scales = _weight_scales(state, str(source.target).rsplit(".", 1)[0])
            half = (qmax - qmin) / 2
            observer.min_val, observer.max_val = -scales * half, scales * half
            # the x86 quantizer's floor on scales (2**-12) would coarsen published weights
            # with smaller ones (resnet50's fc: 1.7e-4)
            observer.eps.fill_(torch.finfo(torch.float32).eps)
        else:  # an activation: the published scale and zero point, on the full 8-bit range
            key = _published_key(source, state)
            fixed = FixedQParamsObserver(
                float(state[f"{key}.scale"]), int(state[f"{key}.zero_point"]),
                dtype=observer.dtype, qscheme=observer.qscheme, quant_min=qmin, quant_max=qmax,
            )  # fmt: skip
            setattr(prepared, str(node.target), fixed)


def _forget_modules() -> None:
    """torchao 0.18 and torch.ao cache a helper's answer per module (``functools.cache`` on
    ``_assert_and_get_unique_device`` and ``assert_and_get_unique_device``), which keeps every
    graph they were asked about, with its float weights, for the process's life: ~130 MB per
    resnet50 conversion. Called after every quantization here."""
    for module, name in (
        ("torchao.utils", "_assert_and_get_unique_device"),
        ("torch.ao.quantization.fx.utils", "assert_and_get_unique_device"),
    ):
        try:
            cached = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        clear = getattr(cached, "cache_clear", None)
        if clear is not None:
            clear()
