"""The split preprocessing (pixels where the image is decoded, normalisation in the worker's model)
gives exactly what torchvision's evaluation transforms give."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.models import get_model_weights
from torchvision.transforms import InterpolationMode

from app.catalog import build_catalog
from app.engine.worker import Runner, WorkerConfig
from app.preprocess import IMAGENET_MEAN, IMAGENET_STD, table_preset
from tests.conftest import IMAGES, require_shared


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    require_shared(IMAGES)  # the real photos: skips without them, fails under CI=true
    paths = [p for p in sorted(IMAGES.iterdir()) if p.suffix in (".png", ".jpg")]
    return [Image.open(p).convert("RGB") for p in paths]


@pytest.mark.parametrize("arch", ["alexnet", "vgg16", "resnet18", "resnet50"])
def test_torchvision_presets_are_bit_identical(photos, arch):
    reference = get_model_weights(arch).DEFAULT.transforms()  # resnet50's V2 resizes to 232
    spec = build_catalog().get(arch)
    for img in photos:
        pixels = spec.transform.pixels(img)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
        assert torch.equal(spec.transform(img), reference(img))


def test_cifar_preset_is_bit_identical(photos):
    reference = T.Compose(
        [
            T.Resize((32, 32), interpolation=InterpolationMode.BILINEAR, antialias=True),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    spec = build_catalog().get("cifar10_resnet20")
    for img in photos:
        assert spec.transform.pixels(img).shape == (3, 32, 32)
        assert torch.equal(spec.transform(img), reference(img))


def test_table_preset_with_own_mean_and_std(photos):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pre = table_preset({"resize": 160, "crop": 128, "mean": list(mean), "std": list(std)})
    reference = T.Compose(
        [T.Resize(160, antialias=True), T.CenterCrop(128), T.ToTensor(), T.Normalize(mean, std)]
    )
    for img in photos:
        assert torch.allclose(pre(img), reference(img), atol=1e-6)


def test_models_with_the_same_geometry_share_pixels():
    cat = build_catalog()
    assert cat.get("resnet18").transform_key == cat.get("alexnet").transform_key
    assert cat.get("resnet18").transform_key != cat.get("resnet50").transform_key  # 256 vs 232
    assert cat.get("cifar10_resnet20").transform_key == cat.get("cifar10_plain56").transform_key


def test_worker_normalises_uint8_pixels_like_the_reference(photos):
    """fp32 eager: uint8 pixels through the worker's model equal the model on normalised floats."""
    spec = build_catalog().get("resnet18")
    runner = Runner(WorkerConfig(0, "cpu", "fp32", False, False, 2, 2, []))
    runner.load(spec.load_plan(None))
    model = runner.models["resnet18"].model  # the bare network inside
    pixels = torch.stack([spec.transform.pixels(i) for i in photos[:4]])
    floats = torch.stack([spec.transform(i) for i in photos[:4]])
    served = runner.forward("resnet18", pixels)
    with torch.inference_mode():
        direct = torch.softmax(model(floats), 1)
    assert torch.allclose(served, direct, atol=1e-6)
    assert torch.allclose(runner.forward("resnet18", floats), direct, atol=1e-6)
