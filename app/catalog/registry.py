"""The catalog: every servable backbone, with labels, preprocessing and reference figures.

Built on torchvision's own model API (``get_model_builder``, ``get_model_weights`` and the weights
enums): labels come from ``meta["categories"]``, preprocessing from ``weights.transforms()``,
figures from ``meta`` -- never copied by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn
from torchvision.models import get_model_builder, get_model_weights

from app.catalog import cifar
from app.engine.plan import LoadPlan
from app.preprocess import Preprocess, cifar_preset, from_torchvision
from app.text import clip

Family = Literal["cnn", "resnet"]

TORCHVISION_CNN = (
    "alexnet",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
)
TORCHVISION_RESNET = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class UnknownModelError(KeyError):
    def __init__(self, name: str, available: Iterable[str]) -> None:
        super().__init__(name)
        self.name = name
        self.available = sorted(available)

    def __str__(self) -> str:  # the name is the client's: cut short
        return f"unknown model {clip(self.name)!r}; available: {', '.join(self.available)}"


class NotAClassifierError(UnknownModelError):
    """A torchvision weights variant without class labels (``vgg16:IMAGENET1K_FEATURES``: a
    feature extractor whose classifier was never trained): not servable, so not in the catalog
    (HTTP 404, like any name that is not a model)."""

    def __str__(self) -> str:
        return (
            f"{clip(self.name)!r} is a feature-extractor weights variant without class labels; "
            f"it cannot classify. Classifier variants: {', '.join(self.available)}"
        )


@dataclass(frozen=True)
class ModelSpec:
    """One servable backbone. ``builder`` is picklable, so worker processes can rebuild it."""

    name: str
    arch: str
    family: Family
    depth: int
    source: Literal["torchvision", "cifar10", "custom"]
    builder: Callable[[], nn.Module] = field(repr=False, compare=False)
    labels: tuple[str, ...] = field(repr=False)
    transform: Preprocess = field(repr=False, compare=False)
    input_size: int
    weights_name: str | None  # the weights enum member, e.g. IMAGENET1K_V2
    weights_file: str | None  # file name in the weights dir, or an absolute path (custom)
    weights_url: str | None
    params: int | None
    gflops: float | None
    acc1: float | None = None
    acc5: float | None = None
    cam_layer: str | None = None  # Grad-CAM layer (custom models' TOML); None: by architecture
    precision: str | None = None  # "int8" for quantized variants; None: the worker's precision
    calibration: str | None = None  # images to quantize on at load time (opt-in int8 PTQ)
    weights_bytes: int | None = None  # the checkpoint's published size, where one is published

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def transform_key(self) -> tuple[object, ...]:
        """Models with equal keys share one pixel tensor (normalisation runs per model)."""
        return self.transform.geometry

    def load_plan(self, weights_path: str | None) -> LoadPlan:
        """How a worker builds this model (``None``: random weights)."""
        return LoadPlan(
            self.name, self.builder, weights_path, self.input_size, self.num_classes,
            self.transform, arch=self.arch, cam_layer=self.cam_layer, precision=self.precision,
            calibration=self.calibration,
        )  # fmt: skip

    @property
    def label_set_key(self) -> int:
        return hash(self.labels)

    def weights_path(self, weights_dir: Path) -> Path | None:
        if self.weights_file is None:
            return None
        p = Path(self.weights_file)
        return p if p.is_absolute() else weights_dir / p

    @property
    def sha256_prefix(self) -> str | None:
        """torch.hub convention: ``name-<first hex digits of sha256>.ext``."""
        if not self.weights_file:
            return None
        m = re.search(r"-([a-f0-9]{6,})\.", Path(self.weights_file).name)
        return m.group(1) if m else None

    def catalog_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "family": self.family,
            "depth": self.depth,
            "source": self.source,
            "params": self.params,
            "gflops": self.gflops,
            "acc1": self.acc1,
            "acc5": self.acc5,
            "weights_name": self.weights_name,
            "weights_file": self.weights_file,
            "input_size": self.input_size,
            "num_classes": self.num_classes,
        }


def _conventional_depth(arch: str) -> int:
    """Weighted layers, as the architectures are named (AlexNet has 8)."""
    if arch == "alexnet":
        return 8
    m = re.search(r"(\d+)", arch)
    if not m:
        raise ValueError(f"cannot tell the depth of {arch!r}")
    return int(m.group(1))


def torchvision_spec(arch: str, variant: str | None = None) -> ModelSpec:
    """A catalog entry for a torchvision ImageNet classifier and one of its weights."""
    enum = get_model_weights(arch)
    classifiers = [f"{arch}:{w.name}" for w in enum if w.meta.get("categories")]
    if variant is None:
        weights = enum.DEFAULT
        name = arch
    else:
        try:
            weights = enum[variant]
        except KeyError:
            raise UnknownModelError(f"{arch}:{variant}", classifiers) from None
        name = f"{arch}:{variant}"
    meta = weights.meta
    if not meta.get("categories"):
        raise NotAClassifierError(name, classifiers)
    metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
    transform = from_torchvision(weights.transforms())
    return ModelSpec(
        name=name,
        arch=arch,
        family="resnet" if arch.startswith("resnet") else "cnn",
        depth=_conventional_depth(arch),
        source="torchvision",
        builder=functools.partial(get_model_builder(arch), weights=None),
        labels=tuple(meta["categories"]),
        transform=transform,
        input_size=transform.output_size,
        weights_name=weights.name,
        weights_file=Path(weights.url).name,
        weights_url=weights.url,
        params=int(meta["num_params"]),
        gflops=float(meta["_ops"]),
        acc1=metrics.get("acc@1"),
        acc5=metrics.get("acc@5"),
        weights_bytes=_published_bytes(meta),
    )


def _published_bytes(meta: dict[str, Any]) -> int | None:
    """torchvision's ``_file_size`` (MB of 2**20 bytes) as bytes."""
    mb = meta.get("_file_size")
    return round(float(mb) * 2**20) if mb else None


# torchvision's quantized ImageNet weights (fbgemm): served as ``ARCH:int8``.
INT8_PUBLISHED = ("resnet18", "resnet50")
INT8 = "int8"


def int8_spec(arch: str) -> ModelSpec:
    """``arch:int8``: torchvision's published int8 weights (the quantized enum's default), with
    their own reference accuracy, downloaded and verified like every checkpoint."""
    from torchvision.models import quantization

    from app.engine.quantize import published_builder

    enum = getattr(quantization, f"{_camel(arch)}_QuantizedWeights")
    weights = enum.DEFAULT
    base = torchvision_spec(arch)
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    return dataclasses.replace(
        base,
        name=f"{arch}:{INT8}",
        builder=published_builder(arch),
        weights_name=weights.name,
        weights_file=Path(weights.url).name,
        weights_url=weights.url,
        acc1=metrics.get("acc@1"),
        acc5=metrics.get("acc@5"),
        precision=INT8,
        weights_bytes=_published_bytes(weights.meta),
    )


def _camel(arch: str) -> str:
    return arch.replace("resnet", "ResNet")


def calibrated_int8_spec(base: ModelSpec, calibration: Path) -> ModelSpec:
    """``NAME:int8`` for a model without published int8 weights: its own checkpoint, quantized
    at load time on the operator's images (IMGCLS_INT8_CALIBRATION). No reference accuracy is
    claimed for it: the float model's figures do not carry over."""
    return dataclasses.replace(
        base,
        name=f"{base.name}:{INT8}",
        acc1=None,
        acc5=None,
        precision=INT8,
        calibration=str(calibration),
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_linear_gflops(model: nn.Module, size: int) -> float:
    """Multiply-accumulates of conv and linear layers per image, in billions (as torchvision)."""
    import torch

    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            total += out.numel() * k
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.inference_mode():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return round(total / 1e9, 4)


def cifar_spec(depth: int, residual: bool) -> ModelSpec:
    kind = "resnet" if residual else "plain"
    build = cifar.cifar_resnet if residual else cifar.cifar_plain
    builder = functools.partial(build, depth)
    model = builder()
    file, acc = cifar.CIFAR_CHECKPOINTS.get(depth, (None, None)) if residual else (None, None)
    transform = cifar_preset()
    return ModelSpec(
        name=f"cifar10_{kind}{depth}",
        arch=f"cifar10_{kind}{depth}",
        family="resnet" if residual else "cnn",
        depth=depth,
        source="cifar10",
        builder=builder,
        labels=cifar.CIFAR10_LABELS,
        transform=transform,
        input_size=transform.output_size,
        weights_name="CIFAR10" if file else None,
        weights_file=file,
        weights_url=cifar.CIFAR_URL + file if file else None,
        params=count_params(model),
        gflops=conv_linear_gflops(model, 32),
        acc1=acc,
        acc5=None,
    )


class Catalog:
    """Registry of specs by name; ``arch:VARIANT`` names resolve torchvision weights lazily."""

    def __init__(self, specs: Iterable[ModelSpec] = ()) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._int8: dict[str, ModelSpec] = {}  # ``NAME:int8`` specs built on lookup
        # IMGCLS_INT8_CALIBRATION: with it, any ``NAME:int8`` is quantized at load time
        self.int8_calibration: Path | None = None
        for s in specs:
            self.add(s)

    def add(self, spec: ModelSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"model {spec.name!r} is already in the catalog")
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return list(self._specs)

    def get(self, name: str) -> ModelSpec:
        """The spec called ``name``; an ``arch:VARIANT`` name resolves without being added to
        the catalog (a lookup must not change what ``GET /models`` lists)."""
        spec = self._specs.get(name)
        if spec is not None:
            return spec
        arch, sep, variant = name.partition(":")
        base = self._specs.get(arch)
        if sep and base is not None and variant == INT8:
            if name in self._int8:
                return self._int8[name]
            if base.source == "torchvision" and arch in INT8_PUBLISHED:
                spec = int8_spec(arch)
            elif self.int8_calibration is not None and base.precision is None:
                spec = calibrated_int8_spec(base, self.int8_calibration)
            else:
                raise UnknownModelError(name, [*self._specs, *self.int8_names()])
            self._int8[name] = spec  # cached apart: /models lists only what is served
            return spec
        if sep and base is not None and base.source == "torchvision":
            return _variant_spec(arch, variant)
        raise UnknownModelError(name, self._specs)

    def int8_names(self) -> list[str]:
        """The ``ARCH:int8`` names with torchvision's published int8 weights."""
        return [f"{a}:{INT8}" for a in INT8_PUBLISHED if a in self._specs]

    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())


@functools.lru_cache(maxsize=64)  # bounded: names are the client's to choose
def _variant_spec(arch: str, variant: str) -> ModelSpec:
    return torchvision_spec(arch, variant)


@functools.lru_cache(maxsize=1)
def _builtin_specs() -> tuple[ModelSpec, ...]:
    specs = [torchvision_spec(a) for a in TORCHVISION_CNN + TORCHVISION_RESNET]
    for residual in (True, False):
        specs += [cifar_spec(d, residual) for d in cifar.CIFAR_DEPTHS]
    return tuple(specs)


def build_catalog(extra: Iterable[ModelSpec] = ()) -> Catalog:
    """The built-in catalog plus extra (custom) specs."""
    return Catalog([*_builtin_specs(), *extra])
