"""Custom models (e.g. your own fine-tuned checkpoints) declared in a TOML file.

    [models.defects_r50]
    arch = "resnet50"               # a catalog arch or any torchvision classification builder
    weights = "/models/defects.pt"  # a state_dict or {"state_dict": ...}; "module." is stripped
    labels = "/models/defects.txt"  # one label per line; their number sets the classifier width
    preprocess = "imagenet"         # or "cifar", or a table: resize, crop, mean, std, interpolation
    cam_layer = "layer4"            # optional: the module Grad-CAM explains (default by arch)

Every problem stops startup with a message naming the file, the entry and what is wrong.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torchvision
from torch import nn
from torchvision.models import get_model_builder, list_models

from app.catalog import cifar
from app.catalog.registry import (
    Catalog,
    Family,
    ModelSpec,
    build_catalog,
    conv_linear_gflops,
    count_params,
)
from app.engine.checkpoint import WeightsError, load_into
from app.preprocess import Preprocess, cifar_preset, imagenet_preset, table_preset

ALLOWED_KEYS = {"arch", "weights", "labels", "preprocess", "family", "depth", "cam_layer"}
RESIDUAL_PREFIXES = ("resnet", "resnext", "wide_resnet", "cifar10_resnet")


class ModelConfigError(ValueError):
    pass


def _builder(arch: str, num_classes: int) -> Callable[[], nn.Module]:
    m = re.fullmatch(r"cifar10_(resnet|plain)(\d+)", arch)
    if m:
        fn = cifar.cifar_resnet if m.group(1) == "resnet" else cifar.cifar_plain
        return functools.partial(fn, int(m.group(2)), num_classes=num_classes)
    if arch not in list_models(module=torchvision.models):
        raise ValueError(
            f"unknown arch {arch!r}: use a torchvision classification model "
            "(e.g. resnet50, vgg16) or cifar10_resnetN / cifar10_plainN"
        )
    return functools.partial(get_model_builder(arch), weights=None, num_classes=num_classes)


def _preprocess(value: Any) -> Preprocess:
    if value == "imagenet":
        return imagenet_preset()
    if value == "cifar":
        return cifar_preset()
    if isinstance(value, dict):
        return table_preset(value)
    raise ValueError(f'preprocess must be "imagenet", "cifar" or a table, got {value!r}')


def _depth(arch: str, model: nn.Module) -> int:
    if arch == "alexnet":
        return 8
    m = re.search(r"(\d+)", arch.removeprefix("cifar10_"))
    if m and not arch.startswith(("efficientnet", "mobilenet", "regnet", "shufflenet")):
        return int(m.group(1))
    return sum(isinstance(x, (nn.Conv2d, nn.Linear)) for x in model.modules())


def _cam_layer(value: Any, model: nn.Module, input_size: int) -> str:
    """A dotted module path of ``model`` (e.g. ``layer4`` or ``features.29``) whose output is a
    feature map Grad-CAM can explain, checked now (one dummy image) so that a typo or a wrong
    module stops startup rather than failing every explanation."""
    from app.engine.explain import is_feature_map, last_feature_map, output_shape

    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"cam_layer must be a module path such as 'layer4', got {value!r}")
    try:
        model.get_submodule(value)
    except AttributeError:
        tops = ", ".join(name for name, _ in model.named_children())
        raise ValueError(
            f"cam_layer {value!r} is not a module of this model (its top-level modules: {tops})"
        ) from None
    shape = output_shape(model, value, input_size)
    if not is_feature_map(shape):
        gives = "nothing (it did not run)" if shape is None else f"shape {shape}"
        try:
            instead = f", such as {last_feature_map(model, input_size)!r} (this model's last)"
        except ValueError:  # none at all: said without an example
            instead = ", and this model has none"
        raise ValueError(
            f"cam_layer {value!r} gives {gives} for one {input_size}x{input_size} image; "
            "Grad-CAM needs a module whose output is (N, C, H, W) feature maps wider than "
            f"1x1{instead}"
        )
    return value


def _read_labels(path: Path) -> tuple[str, ...]:
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first label
    text = path.read_text("utf-8-sig")
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise ValueError(f"labels file {path} has no labels")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels file {path} repeats a label")
    return labels


def _spec(name: str, entry: dict[str, Any], base: Path) -> ModelSpec:
    unknown = set(entry) - ALLOWED_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; allowed: {sorted(ALLOWED_KEYS)}")
    for key in ("arch", "weights", "labels"):
        if key not in entry:
            raise ValueError(f"missing required key {key!r}")
    arch = str(entry["arch"])
    weights = (base / str(entry["weights"])).resolve()
    labels_path = (base / str(entry["labels"])).resolve()
    if not labels_path.is_file():
        raise ValueError(f"labels file {labels_path} does not exist")
    if not weights.is_file():
        raise ValueError(f"weights file {weights} does not exist")
    labels = _read_labels(labels_path)
    builder = _builder(arch, len(labels))
    transform = _preprocess(entry.get("preprocess", "imagenet"))
    model = builder()
    try:
        load_into(model, weights)
    except WeightsError as exc:
        raise ValueError(f"{exc} (the labels file declares {len(labels)} classes)") from None
    size = transform.output_size
    declared = entry.get("family") or ("resnet" if arch.startswith(RESIDUAL_PREFIXES) else "cnn")
    if declared not in ("cnn", "resnet"):
        raise ValueError(f'family must be "cnn" or "resnet", got {declared!r}')
    family: Family = "resnet" if declared == "resnet" else "cnn"
    cam_layer = _cam_layer(entry["cam_layer"], model, size) if "cam_layer" in entry else None
    return ModelSpec(
        name=name,
        arch=arch,
        family=family,
        depth=int(entry.get("depth") or _depth(arch, model)),
        source="custom",
        builder=builder,
        labels=labels,
        transform=transform,
        input_size=size,
        weights_name=weights.name,
        weights_file=str(weights),
        weights_url=None,
        params=count_params(model),
        gflops=conv_linear_gflops(model, size),
        cam_layer=cam_layer,
    )


def catalog_for(config: Path | None, int8_calibration: Path | None = None) -> Catalog:
    """The built-in catalog plus the models declared in ``config`` (IMGCLS_MODEL_CONFIG), with
    ``NAME:int8`` by calibration on the images in ``int8_calibration`` (IMGCLS_INT8_CALIBRATION)
    where a model has no published int8 weights."""
    catalog = (
        build_catalog()
        if config is None
        else build_catalog(load_model_config(config, set(build_catalog().names())))
    )
    catalog.int8_calibration = int8_calibration
    return catalog


def load_model_config(path: Path, reserved: set[str]) -> list[ModelSpec]:
    """Specs for every ``[models.NAME]`` table in ``path``; raises ModelConfigError otherwise."""
    where = f"model config {path}"
    try:
        doc = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(f"{where}: file does not exist") from None
    except OSError as exc:  # a folder, no permission, ...
        raise ModelConfigError(f"{where}: cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{where}: not valid TOML: {exc}") from None
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise ModelConfigError(f"{where}: no [models.NAME] tables")
    specs = []
    for name, entry in models.items():
        # a path segment on every route (/models/NAME, /v2/models/NAME): no leading . or -
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}", name):
            raise ModelConfigError(
                f"{where}: [models.{name}]: a name is 1-64 letters, digits, _ . - and starts "
                "with a letter, digit or _"
            )
        if name in reserved:
            raise ModelConfigError(f"{where}: [models.{name}]: name is taken by a built-in model")
        if not isinstance(entry, dict):
            raise ModelConfigError(f"{where}: [models.{name}]: must be a table")
        try:
            specs.append(_spec(name, entry, path.parent))
        except Exception as exc:
            raise ModelConfigError(f"{where}: [models.{name}]: {exc}") from None
    return specs
