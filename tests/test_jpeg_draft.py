"""JPEG draft decoding (IMGCLS_JPEG_DRAFT): JPEGs decoded at the smallest DCT scale that keeps
3x the model's resize target, then resized as before. Held to the exact path on real photos
(pixels) and on the real CIFAR-10 ResNets (tests/guard.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import imaging
from app.catalog import build_catalog
from app.engine.decoding import DRAFT_MARGIN, decode_pixels, draft_side
from app.engine.worker import Runner, WorkerConfig
from app.evaluate import list_images
from tests import guard
from tests.conftest import CIFAR_FILES, CIFAR_SAMPLE, CIFAR_WEIGHTS, IMAGES, needs_shared

# Measured on the shared photos (camera, chelsea, coffee, horse, hubble, motorcycle, rocket,
# astronaut) at their own size, 2x and 4032 px wide, for resnet50, alexnet and the CIFAR squash:
# mean 0.054 grey levels over all, worst image 0.63 (the motorcycle's fine detail at 4032 px).
MAX_MEAN_DIFF = 0.5
MAX_IMAGE_DIFF = 1.5


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_draft_scale_keeps_twice_the_target():
    big = _jpeg(Image.new("RGB", (4032, 3024), (120, 60, 30)))
    resnet = build_catalog().get("resnet50").transform
    side = draft_side({0: resnet})
    assert side == DRAFT_MARGIN * resnet.resize == 696
    img = imaging.decode(big, 10**9, side)
    assert min(img.size) >= side and img.size == (1008, 756)  # 1/4: 1/8 would leave 378
    assert img.info["source_size"] == (4032, 3024)
    assert imaging.decode(big, 10**9).size == (4032, 3024)  # off: the exact, full decode
    small = _jpeg(Image.new("RGB", (500, 375)))
    assert imaging.decode(small, 10**9, side).size == (500, 375)  # too small to scale
    png = io.BytesIO()
    Image.new("RGB", (4032, 3024)).save(png, "PNG")
    assert imaging.decode(png.getvalue(), 10**9, side).size == (4032, 3024)  # JPEG only


@needs_shared(IMAGES)
def test_draft_pixels_match_the_exact_path_on_real_photos():
    catalog = build_catalog()
    transforms = {m: catalog.get(m).transform for m in ("resnet50", "alexnet", "cifar10_resnet20")}
    photos = sorted(p for p in IMAGES.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(photos) >= 5
    diffs = []
    for path in photos:
        img = Image.open(path).convert("RGB")
        for width in (img.width, 2 * img.width, 4032):
            sized = img.resize((width, round(img.height * width / img.width)), Image.BICUBIC)
            data = _jpeg(sized)
            exact, _, _ = decode_pixels(data, 10**9, transforms)
            draft, _, _ = decode_pixels(data, 10**9, transforms, draft=True)
            for key in transforms:
                d = (exact[key].float() - draft[key].float()).abs().mean().item()
                diffs.append(d)
                assert d <= MAX_IMAGE_DIFF, f"{path.name} at {width} px, {key}: {d:.2f}"
    print(f"draft vs exact: mean {np.mean(diffs):.3f} grey levels, worst {max(diffs):.3f}")
    assert np.mean(diffs) <= MAX_MEAN_DIFF


# CIFAR test images upscaled (bicubic) and saved as JPEG q92 at three sizes in turn, so that the
# CIFAR target (32, drafted down to >= 96) is decoded at 1/4 (1008x756 -> 252x189), 1/2
# (448x336) and in full (224x168). Phone size itself (4032x3024) is too slow for 1,000 images in CI.
SIZES = ((1008, 756), (448, 336), (224, 168))


@pytest.fixture(scope="module")
def upscaled() -> tuple[dict[str, torch.Tensor], np.ndarray]:
    spec = build_catalog().get("cifar10_resnet20")
    items = list_images(CIFAR_SAMPLE)
    exact, draft = [], []
    for i, (path, _) in enumerate(items):
        data = _jpeg(Image.open(path).convert("RGB").resize(SIZES[i % 3], Image.BICUBIC))
        exact.append(decode_pixels(data, 10**9, {0: spec.transform})[0][0])
        draft.append(decode_pixels(data, 10**9, {0: spec.transform}, draft=True)[0][0])
    y = np.array([spec.labels.index(label) for _, label in items])
    return {"exact": torch.stack(exact), "draft": torch.stack(draft)}, y


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
@pytest.mark.parametrize("model", list(CIFAR_FILES))
def test_draft_decoding_guard(upscaled, model: str):
    x, y = upscaled
    assert len(y) == 1000
    runner = Runner(WorkerConfig(0, "cpu", "fp32", False, False, 2, 2, []))
    runner.load(build_catalog().get(model).load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES[model])))
    top1 = {k: runner.forward(model, v).argmax(1).numpy() for k, v in x.items()}
    guard.check(f"{model} JPEG draft (upscaled CIFAR)", top1["draft"], top1["exact"], y)


def test_draft_setting_reaches_the_worker(tmp_path: Path):
    from app.settings import Settings

    assert Settings().jpeg_draft is True
    assert Settings(jpeg_draft=False).jpeg_draft is False
