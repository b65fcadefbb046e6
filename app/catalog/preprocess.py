"""Preprocessing presets: PIL RGB image -> normalised CHW float tensor.

torchvision entries use their weights' own ``transforms()``; these presets cover the CIFAR nets
and custom checkpoints, built from the same torchvision pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms._presets import ImageClassification
from torchvision.transforms.functional import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


def imagenet_preset() -> Transform:
    """torchvision's ImageNet evaluation transform (as ResNet18_Weights.IMAGENET1K_V1 has it)."""
    return ImageClassification(crop_size=224, resize_size=256)


def cifar_preset() -> Transform:
    """The CIFAR ResNets' test transform: squash to 32x32, [0, 1], ImageNet mean/std, no crop."""
    return T.Compose(
        [
            T.Resize((32, 32), interpolation=InterpolationMode.BILINEAR, antialias=True),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def table_preset(table: Mapping[str, Any]) -> Transform:
    """A transform from a config table: resize, crop, mean, std, interpolation.

    With ``crop`` it follows torchvision's evaluation recipe (resize the short side, centre-crop);
    without it the image is resized to exactly ``resize`` (an int or [h, w]).
    """
    known = {"resize", "crop", "mean", "std", "interpolation"}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"unknown preprocess keys {sorted(unknown)}; allowed: {sorted(known)}")
    if "resize" not in table:
        raise ValueError("preprocess table needs 'resize'")
    try:
        interp = InterpolationMode(str(table.get("interpolation", "bilinear")).lower())
    except ValueError:
        allowed = [m.value for m in InterpolationMode]
        raise ValueError(f"interpolation must be one of {allowed}") from None
    mean = tuple(float(v) for v in table.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in table.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError("mean and std need three values each, std > 0")
    resize = table["resize"]
    if "crop" in table:
        return ImageClassification(
            crop_size=int(table["crop"]),
            resize_size=int(resize),
            mean=mean,
            std=std,
            interpolation=interp,
        )
    size = (int(resize), int(resize)) if isinstance(resize, int) else tuple(int(v) for v in resize)
    return T.Compose(
        [
            T.Resize(size, interpolation=interp, antialias=True),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def transform_key(transform: Transform) -> str:
    """Identity of a transform's behaviour, so /compare preprocesses once per distinct one."""
    return repr(transform)


def output_size(transform: Transform) -> int:
    """Side of the square tensor the transform produces."""
    probe = transform(Image.new("RGB", (64, 48)))
    return int(probe.shape[-1])
