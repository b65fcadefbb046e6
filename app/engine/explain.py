"""Grad-CAM explanations: which pixels a model used for the class it answered.

Grad-CAM (Selvaraju et al. 2017) weighs each channel of a late feature map by the mean gradient
of the class score over that channel, sums the channels and keeps the positive part: a coarse map
(7x7 for a ResNet at 224 px, 8x8 for a CIFAR ResNet) upsampled to the pixels the model saw.

Library: Captum's ``LayerGradCam`` (PyTorch's own interpretability library), not ``grad-cam``
(PyPI ``grad-cam``, jacobgil/pytorch-grad-cam). Measured with ``bench/gradcam_libs.py`` on this
project's shared 2-core AMD EPYC, fp32 eager, one thread, top-1 map at the input size:

- dependencies: captum 0.9 needs matplotlib, numpy, packaging, tqdm and torch, all of them
  imgcls dependencies already: it adds one package (4.4 MB installed). grad-cam 1.5.7 adds
  opencv-python-headless, scikit-learn, scipy and ttach (with joblib, threadpoolctl, narwhals,
  cloudpickle): about 350 MB installed, and 2.7 s to import against captum's 0.4 s.
- median ms per explanation: resnet18 at 224 px, captum 48 vs grad-cam 147; CIFAR ResNet-56 at
  32 px, captum 7.7 vs 22.9; 200 CIFAR images in one batch, captum 7.2 vs 9.7 per image.
  grad-cam backpropagates with ``.backward()``, so every parameter must require a gradient (the
  worker's do not) and the whole network's weight gradients are computed; Captum takes
  ``autograd.grad`` with respect to the layer's output only. Here the forward function returns
  the explained logit itself, so one forward pass both picks the top-1 and explains it.

Which layer (``default_cam_layer``): Grad-CAM wants the last convolutional feature maps, where
the spatial layout is still there and the features are the most class-specific.

- AlexNet/VGG: the ReLU that follows the last ``nn.Conv2d`` of ``features`` (after its BatchNorm
  in the ``_bn`` variants), not the conv itself. The rectified maps are what the next layer sees
  and what the Grad-CAM authors' code hooks (``relu5_3`` of VGG-16, ``relu5`` of AlexNet): on the
  raw conv output, negative activations times positive channel weights pull the map below zero
  where a feature is merely absent. (Either is safe with torchvision's in-place ReLUs: Captum
  clones the output it hooks.)
- torchvision ResNets (and ResNeXt, Wide ResNet): ``layer4``, whose output is its last block's.
- CIFAR ResNets and plain nets (app/catalog/cifar.py): ``layer3``, likewise.
- anything else: the last module, in execution order, whose output is a 4-D map wider than 1x1,
  found with forward hooks on a dummy input.

Framework-free on purpose (no FastAPI): it runs inside the device worker processes.
"""

from __future__ import annotations

import base64
import io
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


class Explanation(NamedTuple):
    """What ``explain`` returns, one row per image."""

    heatmaps: torch.Tensor  # (N, H, W) float32 in [0, 1], at the input's resolution, on the CPU
    targets: torch.Tensor  # (N,) int64: the class each map explains
    scores: torch.Tensor  # (N,) float32: the softmax probability of that class


def _after_last_conv(features: nn.Module, prefix: str) -> str:
    """The first ReLU after the last conv of a plain CNN's ``features`` (the conv if none)."""
    names = [(name, m) for name, m in features.named_children()]
    convs = [i for i, (_, m) in enumerate(names) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{prefix} has no nn.Conv2d")
    last = convs[-1]
    for name, m in names[last + 1 :]:
        if isinstance(m, nn.ReLU):
            return f"{prefix}.{name}"
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
            break
    return f"{prefix}.{names[last][0]}"


def _hooked_dummy_forward(
    model: nn.Module, modules: list[nn.Module], hook: Any, input_size: int
) -> None:
    """One dummy image through ``model`` with ``hook`` on each of ``modules``: eval mode, no
    gradients (batch-norm statistics are left alone); the model's own mode is restored."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    handles = [m.register_forward_hook(hook) for m in modules]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size, device=device, dtype=dtype))
    finally:
        model.train(training)
        for h in handles:
            h.remove()


def output_shape(model: nn.Module, layer: str, input_size: int = 224) -> tuple[int, ...] | None:
    """The shape of what module ``layer`` of ``model`` gives for one dummy image (None: not a
    tensor, or the module did not run)."""
    shapes: list[tuple[int, ...] | None] = []

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        shapes.append(tuple(out.shape) if isinstance(out, torch.Tensor) else None)

    _hooked_dummy_forward(model, [model.get_submodule(layer)], hook, input_size)
    return shapes[-1] if shapes else None


def is_feature_map(shape: tuple[int, ...] | None) -> bool:
    """What Grad-CAM can explain: (N, C, H, W) maps wider than 1x1."""
    return shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1


def last_feature_map(model: nn.Module, input_size: int = 224) -> str:
    """The last module, in execution order, whose output is a (N, C, H, W) map with H*W > 1,
    found by one dummy image (``_hooked_dummy_forward``)."""
    names = {m: name for name, m in model.named_modules() if name}
    found: list[str] = []

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and is_feature_map(tuple(out.shape)):
            found.append(names[mod])

    _hooked_dummy_forward(model, list(names), hook, input_size)
    if not found:
        raise ValueError("the model has no module with a 4-D output wider than 1x1")
    return found[-1]


def default_cam_layer(arch: str, model: nn.Module, input_size: int = 224) -> str:
    """The dotted module path Grad-CAM hooks by default for ``model`` (see the module docstring).

    ``input_size`` is only used by the fallback's dummy forward pass.
    """
    from torchvision.models import VGG, AlexNet, ResNet

    from app.catalog.cifar import CifarResNet

    if isinstance(model, (AlexNet, VGG)) or arch == "alexnet" or arch.startswith("vgg"):
        features = getattr(model, "features", None)
        if isinstance(features, nn.Module):
            return _after_last_conv(features, "features")
    if isinstance(model, ResNet):
        return "layer4"
    if isinstance(model, CifarResNet):
        return "layer3"
    return last_feature_map(model, input_size)


def explain(
    model: nn.Module, x: torch.Tensor, layer: str, target: int | None = None
) -> Explanation:
    """Grad-CAM maps of ``model`` for normalised images ``x`` ((3, H, W) or (N, 3, H, W)).

    ``target`` is a class index for every image, or None for each image's own top-1. The model
    must be in eval mode and float32; its parameters may have ``requires_grad`` False (Grad-CAM
    needs gradients with respect to the layer's activations only). Gradients are switched on here,
    also when the caller runs under ``torch.no_grad`` or ``torch.inference_mode``, and nothing
    outside this call changes. The map is upsampled bilinearly to (H, W), rectified and scaled
    per image to [0, 1]; a map with no positive evidence is all zeros.
    """
    # Imported here: captum loads matplotlib (0.4 s), paid only by workers that explain.
    from captum.attr import LayerGradCam

    if model.training:
        raise ValueError("explain needs a model in eval mode (batch norm would learn from it)")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"expected float32 normalised images, got {x.dtype}")
    module = model.get_submodule(layer)
    n, _, h, w = x.shape
    seen: dict[str, torch.Tensor] = {}

    def target_logit(inp: torch.Tensor) -> torch.Tensor:
        # The forward pass Captum differentiates returns the explained logit itself, so the
        # top-1 is chosen in the same pass (no second forward to find it).
        logits = model(inp)
        if target is None:
            idx = logits.argmax(dim=1)
        elif not 0 <= target < logits.shape[1]:
            raise ValueError(f"target {target} is not a class index (0..{logits.shape[1] - 1})")
        else:
            idx = torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
        seen["logits"], seen["idx"] = logits.detach(), idx
        return logits.gather(1, idx[:, None]).squeeze(1)

    with torch.inference_mode(False), torch.enable_grad():
        # A tensor made under the caller's inference mode cannot enter autograd: copy it.
        inp = x.detach().clone()
        cam = LayerGradCam(target_logit, module).attribute(inp)
        assert isinstance(cam, torch.Tensor)
        cam = cam.detach()
    if cam.dim() != 4:
        raise ValueError(f"layer {layer!r} gives no (N, C, H, W) feature map")
    maps = F.interpolate(cam.float(), size=(h, w), mode="bilinear", align_corners=False)
    maps = maps.squeeze(1).relu()
    lo = maps.flatten(1).min(dim=1).values.view(n, 1, 1)
    span = maps.flatten(1).max(dim=1).values.view(n, 1, 1) - lo
    flat = span <= 1e-12
    maps = torch.where(flat, torch.zeros_like(maps), (maps - lo) / torch.where(flat, 1.0, span))
    probs = seen["logits"].float().softmax(dim=1)
    idx = seen["idx"]
    scores = probs.gather(1, idx[:, None]).squeeze(1)
    return Explanation(maps.clamp_(0.0, 1.0).cpu(), idx.cpu(), scores.cpu())


def _jet_lut() -> np.ndarray:
    """The jet colormap as 256 RGB entries (dark blue -> cyan -> yellow -> dark red), from its
    piecewise-linear definition: the look of the Grad-CAM paper's figures, without matplotlib."""
    t = np.linspace(0.0, 1.0, 256)[:, None]
    centres = np.array([[3.0, 2.0, 1.0]])  # where red, green, blue peak, in quarters of the range
    rgb = np.clip(1.5 - np.abs(4.0 * t - centres), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


JET = _jet_lut()


def overlay_png(
    pixels: torch.Tensor | np.ndarray, heatmap: torch.Tensor | np.ndarray, alpha: float = 0.5
) -> bytes:
    """PNG of the model's input pixels (uint8 (3, H, W)) with the heatmap ((H, W) in [0, 1])
    colour-mapped (jet: blue = unused, red = most used) and blended on at ``alpha``."""
    img = np.asarray(pixels.cpu() if isinstance(pixels, torch.Tensor) else pixels)
    heat = np.asarray(heatmap.cpu() if isinstance(heatmap, torch.Tensor) else heatmap)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"pixels must be uint8 (3, H, W), got {img.dtype} {img.shape}")
    if heat.shape != img.shape[1:]:
        raise ValueError(f"heatmap {heat.shape} does not match the pixels {img.shape[1:]}")
    levels = np.clip(np.nan_to_num(heat.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    colour = JET[levels].astype(np.float32)  # (H, W, 3)
    blend = (1.0 - alpha) * img.transpose(1, 2, 0).astype(np.float32) + alpha * colour
    out = Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    buf = io.BytesIO()
    out.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    """A ``data:`` URL for a PNG, to put straight into JSON and an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def heatmap_similarity(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Pearson correlation of two heatmaps of the same shape, in [-1, 1].

    A flat map (no variance) correlates with nothing: 0.0, not NaN.
    """
    x = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64).ravel()
    y = np.asarray(b.cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64).ravel()
    if np.shape(a) != np.shape(b):
        raise ValueError(f"heatmaps differ in shape: {np.shape(a)} vs {np.shape(b)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return 0.0
    x = x - x.mean()
    y = y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    if den <= 1e-12:
        return 0.0
    return float(np.clip((x * y).sum() / den, -1.0, 1.0))
