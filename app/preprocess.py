"""Preprocessing: PIL RGB image -> 8-bit pixels (resize, crop) -> normalised float tensor.

The two halves run in different places. ``Preprocess.pixels`` (the geometry: resize and centre
crop, in Pillow) runs where the image is decoded and gives a uint8 CHW tensor, four times smaller
than floats to hand to a worker; ``normalize`` (``/255``, mean, std) runs in the worker on the
whole batch, on its device, fused into the compiled model. ``Preprocess(image)`` runs both and
gives exactly what torchvision's evaluation transforms give (the same operations in the same
order); the tests hold it to that.

torchvision entries take their parameters from their weights' own ``transforms()``; the presets
here cover the CIFAR nets and custom checkpoints.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import functional as F
from torchvision.transforms._presets import ImageClassification
from torchvision.transforms.functional import InterpolationMode, pil_modes_mapping
from torchvision.transforms.v2 import functional as F2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Triple = tuple[float, float, float]


MAX_SIDE = 4096  # a model input side a config may ask for (ImageNet models take 224-600)


def _triple(values: Any, what: str) -> Triple:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) != 3:
        raise ValueError(f"{what} needs three numbers (R, G, B)")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise ValueError(f"{what} needs three numbers (R, G, B), got {values!r}")
    a, b, c = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (a, b, c)):
        raise ValueError(f"{what} values must be finite, got {values!r}")
    return (a, b, c)


def _side(value: Any, what: str) -> int:
    """A whole number of pixels in 1..MAX_SIDE (TOML's 256.0 is one; 32.7 or true is not)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"{what} must be a whole number of pixels, 1 to {MAX_SIDE}; got {value!r}")
    return value


@dataclass(frozen=True)
class Preprocess:
    """One model's evaluation transform, split into geometry (``pixels``) and ``normalize``.

    ``resize`` as an int scales the short side to it (torchvision's recipe, followed by a centre
    ``crop``); as ``(h, w)`` it resizes to exactly that size.
    """

    resize: int | tuple[int, int]
    crop: int | None
    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def __post_init__(self) -> None:
        if min(self.std) <= 0:
            raise ValueError("std values must be > 0")

    @property
    def geometry(self) -> tuple[Any, ...]:
        """What ``pixels`` depends on: models with equal geometry share one pixel tensor."""
        return (self.resize, self.crop, self.interpolation.value)

    @property
    def output_size(self) -> int:
        """Side of the square the transform produces."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, int):
            raise ValueError("a short-side resize without a crop has no fixed output size")
        h, w = self.resize
        if h != w:
            raise ValueError(f"the output must be square, got {h}x{w}")
        return h

    @property
    def _size(self) -> list[int]:
        """``resize`` as torchvision's functional resize takes it."""
        return [self.resize] if isinstance(self.resize, int) else list(self.resize)

    def resized_size(self, width: int, height: int) -> list[int]:
        """[h, w] that ``resize`` gives an image of this size (torchvision's rounding)."""
        if not isinstance(self.resize, int):
            return list(self.resize)
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize * long / short)
        return [new_long, self.resize] if width <= height else [self.resize, new_long]

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """Resize and crop an RGB image: uint8 tensor (3, S, S).

        An image decoded at a reduced scale (JPEG draft, ``Image.reduce``) carries its full size
        in ``info["source_size"]`` and the region that holds it in ``info["source_box"]``: that
        region is resized to exactly what the full image would give, so the crop takes the same
        region (a scaled side is rounded up to a partial last block, which would otherwise
        stretch the image by up to a pixel of the scaled size)."""
        source = image.info.get("source_size")
        if source is None:
            img = F.resize(image, self._size, interpolation=self.interpolation, antialias=True)
        else:  # what F.resize does with a PIL image, on the region that holds the full image
            height, width = self.resized_size(*source)
            resample = pil_modes_mapping[self.interpolation]
            box = image.info.get("source_box")
            if box is not None:  # never past the image, whatever the decoder reported
                x0, y0, x1, y1 = box
                box = (max(0.0, x0), max(0.0, y0), min(x1, image.width), min(y1, image.height))
            img = image.resize((width, height), resample, box=box)
        if self.crop is not None:
            img = F.center_crop(img, [self.crop])
        return F.pil_to_tensor(img)

    def pixels_from_tensor(
        self, image: torch.Tensor, source_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The same geometry for a decoded uint8 tensor (3, H, W), on its own device (the GPU
        decode path, and on the CPU the fast path of ``decoding.decode_pixels``). Antialiased
        like Pillow, but not bit-identical to it: the tests hold it to the Pillow path.

        ``source_size``: (width, height) of the full image when ``image`` was decoded at a
        reduced scale and holds exactly all of it (no partial last block)."""
        size = self._size if source_size is None else self.resized_size(*source_size)
        img = F2.resize(image, size, interpolation=self.interpolation, antialias=True)
        if self.crop is not None:
            img = F2.center_crop(img, [self.crop])
        return img

    @property
    def tensor_resize(self) -> bool:
        """Whether torch's uint8 antialiased resize (a vectorised port of Pillow's: ~2-3x
        faster than Pillow's) implements this interpolation on this CPU: bilinear and bicubic,
        where torch runs its AVX2/AVX-512 kernels (elsewhere torchvision would convert to
        float32 first, slower than Pillow)."""
        bilinear_or_bicubic = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
        return self.interpolation in bilinear_or_bicubic and _vectorised_cpu()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The whole transform: normalised float32 tensor (3, S, S)."""
        return normalize(self.pixels(image), self.mean, self.std)


@functools.cache
def _vectorised_cpu() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 in [0, 1], minus mean, over std (torchvision's order)."""
    x = pixels.to(torch.float32) / 255.0
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def from_torchvision(t: ImageClassification) -> Preprocess:
    """The parameters of a weights enum's ``transforms()``."""
    return Preprocess(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=_triple(t.mean, "mean"),
        std=_triple(t.std, "std"),
        interpolation=t.interpolation,
    )


def imagenet_preset() -> Preprocess:
    """torchvision's ImageNet evaluation transform (as ResNet18_Weights.IMAGENET1K_V1 has it)."""
    return Preprocess(resize=256, crop=224)


def cifar_preset() -> Preprocess:
    """The CIFAR ResNets' test transform: squash to 32x32, [0, 1], ImageNet mean/std, no crop."""
    return Preprocess(resize=(32, 32), crop=None)


def table_preset(table: Mapping[str, Any]) -> Preprocess:
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
    mean = _triple(table.get("mean", IMAGENET_MEAN), "mean")
    std = _triple(table.get("std", IMAGENET_STD), "std")  # > 0: checked by Preprocess
    resize = table["resize"]
    if "crop" in table:
        short, crop = _side(resize, "resize (with crop)"), _side(table["crop"], "crop")
        if crop > short:
            raise ValueError(f"crop ({crop}) must not be larger than resize ({short})")
        return Preprocess(short, crop, mean, std, interp)
    if isinstance(resize, list | tuple):
        if len(resize) != 2:
            raise ValueError("resize needs one value or two ([h, w])")
        size = (_side(resize[0], "resize"), _side(resize[1], "resize"))
    else:
        side = _side(resize, "resize")
        size = (side, side)
    if size[0] != size[1]:
        raise ValueError(f"the output must be square, got resize {size[0]}x{size[1]}")
    return Preprocess(size, None, mean, std, interp)
