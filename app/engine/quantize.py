"""int8 models on the CPU: torchvision's published quantized ResNets, and opt-in post-training
quantization calibrated on images the operator provides.

int8 is where CPUs without AMX gain most (resnet50 on a 2-core AMD EPYC with VNNI: ~2.7x bf16),
but only where it is honest: published weights come with their own reference accuracy, and
models quantized here pass an accuracy guard on real images (tests/test_int8.py).

Post-training quantization uses FX graph mode (``torch.ao.quantization.quantize_fx``) with the
x86 engine: torch 2.14 no longer ships the PT2E X86InductorQuantizer in ``torch.ao`` (it moved to
torchao, which is not a dependency), and FX runs the result eagerly on fbgemm/oneDNN int8 kernels
without a compile step. FX traces through the CIFAR ResNets' option-A shortcuts (strided slice and
zero channel padding, no parameters): the slice and pad run on the quantized tensor and the
residual sum becomes a quantized ``add_relu``. Convolutions narrower than 32 channels and the
last linear layer stay in float32: few accumulation terms leave int8 rounding little to average
out, and they held most of the error on the CIFAR ResNets (16-channel first stage): the worst
top-1 agreement with fp32 on the guard's 500 images rose from 97.6% (resnet44, only the first
convolution and the last layer in float) to 98.4%; all four pass at 98.4-98.8%. ImageNet ResNets
keep only their first convolution (3 input channels) in float. Activation ranges are min/max
(histogram observers were slower to calibrate and no more accurate here).
"""

from __future__ import annotations

import functools
import importlib
import logging
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from app.engine.fastpath import cpu_features
from app.preprocess import Preprocess, normalize

log = logging.getLogger("imgcls.quantize")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_CALIBRATION_IMAGES = 512
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


def _reduce_range() -> bool:
    """7-bit activations where int8 dot products could saturate (plain AVX2 without VNNI)."""
    return not cpu_features().vnni


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


def calibrate(model: nn.Module, pre: Preprocess, folder: Path) -> nn.Module:
    """Post-training int8 quantization of a float model (eval mode, on the CPU), calibrated on
    the images in ``folder`` preprocessed as for serving. The result takes normalised float32."""
    from torch.ao.quantization import (
        MinMaxObserver,
        PerChannelMinMaxObserver,
        QConfig,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = use_quantized_engine()
    qconfig = QConfig(
        activation=MinMaxObserver.with_args(reduce_range=_reduce_range()),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        ),
    )
    mapping = get_default_qconfig_mapping(engine).set_global(qconfig)
    for name in _float_modules(model):
        mapping.set_module_name(name, None)
    files = calibration_images(folder)
    size = pre.output_size
    example = (torch.zeros(1, 3, size, size),)
    prepared = prepare_fx(model.eval(), mapping, example)
    with torch.no_grad():  # observers keep state across batches: not inference tensors
        for i in range(0, len(files), CALIBRATION_BATCH):
            chunk = files[i : i + CALIBRATION_BATCH]
            pixels = torch.stack([pre.pixels(Image.open(f).convert("RGB")) for f in chunk])
            prepared(normalize(pixels, pre.mean, pre.std))
    log.info("calibrated int8 on %d images from %s (%s engine)", len(files), folder, engine)
    return convert_fx(prepared).eval()
