"""Grad-CAM explanations (app/engine/explain.py), and proof that the maps mean something.

Plumbing with small torchvision models (random weights, real photos); the proof with the real
pretrained CIFAR-10 ResNet-56 on 200 real CIFAR-10 test images (20 per class):

- deletion (Samek et al. 2017): greying out the pixels the model's own map ranks highest must hurt
  its top-1 score at least 3x more than greying out those it ranks lowest, and more than a random
  square of the same area;
- model randomisation (Adebayo et al. 2018): the maps of the trained network and of the same
  architecture re-initialised must hardly share a ranking, while two runs of the trained network
  agree.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import get_model_builder

from app.catalog import build_catalog
from app.catalog.cifar import cifar_plain, cifar_resnet
from app.engine.explain import (
    Explanation,
    data_url,
    default_cam_layer,
    explain,
    heatmap_similarity,
    last_feature_map,
    overlay_png,
)
from app.preprocess import normalize
from tests.conftest import (
    CIFAR_FILES,
    CIFAR_SAMPLE,
    CIFAR_WEIGHTS,
    IMAGES,
    needs_shared,
    require_shared,
)

PER_CLASS = 20  # 200 images in all
# 20% of the 32x32 pixels, rounded to a square's area (14 x 14 = 196 of 1,024 = 19.1%), so that the
# highest-ranked, the lowest-ranked and the random square remove exactly as many pixels.
SIDE = round(math.sqrt(0.2 * 32 * 32))
K = SIDE * SIDE


def frozen(model: nn.Module) -> nn.Module:
    """As the device worker holds a model: eval mode, no parameter wants a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def torchvision_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return frozen(get_model_builder(arch)(weights=None))


# -- which layer ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("alexnet", "features.11"), ("vgg11", "features.19"), ("vgg11_bn", "features.27")],
)
def test_plain_cnns_explain_the_rectified_last_conv_of_features(arch: str, expected: str) -> None:
    model = torchvision_model(arch)
    layer = default_cam_layer(arch, model)
    assert layer == expected
    features = list(model.features)  # type: ignore[arg-type]
    index = int(layer.split(".")[1])
    last_conv = max(i for i, m in enumerate(features) if isinstance(m, nn.Conv2d))
    assert isinstance(features[index], nn.ReLU)
    # the ReLU of the last conv: nothing but (for _bn) its BatchNorm in between
    assert all(isinstance(m, nn.BatchNorm2d) for m in features[last_conv + 1 : index])


def test_resnets_explain_the_last_stage() -> None:
    r18 = torchvision_model("resnet18")
    assert default_cam_layer("resnet18", r18) == "layer4"
    # the stage's output is its last block's: the same tensor a hook on layer4[-1] sees
    assert last_feature_map(r18) == "layer4"
    for arch, model in [
        ("cifar10_resnet56", cifar_resnet(56)),
        ("cifar10_plain20", cifar_plain(20)),
    ]:
        assert default_cam_layer(arch, model.eval()) == "layer3"
        assert last_feature_map(model, 32) == "layer3"


def test_other_architectures_fall_back_to_the_last_spatial_map() -> None:
    model = torchvision_model("mobilenet_v3_small")
    assert default_cam_layer("mobilenet_v3_small", model) == "features"
    # the fallback's dummy pass leaves a training-mode model in training mode, stats untouched
    model.train()
    stats = [b.clone() for b in model.buffers()]
    last_feature_map(model)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))


# -- maps on real photos ----------------------------------------------------------------------------


def photo_batch(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real photos through the model's own catalog transform: (uint8 pixels, normalised)."""
    spec = build_catalog().get(arch)
    names = ["chelsea.png", "coffee.png"]
    require_shared(*(IMAGES / n for n in names))
    pixels = torch.stack(
        [spec.transform.pixels(Image.open(IMAGES / n).convert("RGB")) for n in names]
    )
    return pixels, normalize(pixels, spec.transform.mean, spec.transform.std)


@needs_shared
@pytest.mark.parametrize(
    ("arch", "context"),
    [
        ("alexnet", torch.inference_mode),  # as the worker calls: inside its inference mode
        ("vgg11", torch.inference_mode),
        ("resnet18", torch.inference_mode),
        ("resnet18", torch.no_grad),
    ],
)
def test_heatmaps_at_input_size_in_unit_range_under_the_callers_no_grad(
    arch: str, context: Callable[[], Any]
) -> None:
    model = torchvision_model(arch)
    _, x = photo_batch(arch)
    with context():
        logits = model(x)
        got = explain(model, x, default_cam_layer(arch, model))
        assert not torch.is_grad_enabled()  # the caller's mode is back
    assert isinstance(got, Explanation)
    assert got.heatmaps.shape == (2, 224, 224) and got.heatmaps.dtype == torch.float32
    assert float(got.heatmaps.min()) >= 0.0 and float(got.heatmaps.max()) <= 1.0
    assert torch.isfinite(got.heatmaps).all()
    assert torch.equal(got.targets, logits.argmax(1))  # target=None: each image's own top-1
    torch.testing.assert_close(got.scores, logits.softmax(1).max(1).values)
    for row in got.heatmaps:  # each map spans [0, 1] (min-max per image)
        assert float(row.max()) == 1.0 and float(row.min()) == 0.0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_flat_map_is_zeros_not_nan() -> None:
    # all-zero activations at the layer: no evidence anywhere, the map must be 0, not 0/0
    conv = nn.Conv2d(3, 4, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    model = frozen(
        nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    )
    got = explain(model, torch.randn(3, 3, 16, 16), "1")
    assert got.heatmaps.shape == (3, 16, 16)
    assert torch.equal(got.heatmaps, torch.zeros(3, 16, 16))


def test_bad_calls_are_clear_errors() -> None:
    model = frozen(cifar_resnet(20))
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="not a class index"):
        explain(model, x, "layer3", target=10)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        explain(model, torch.zeros(1, 1, 32, 32), "layer3")
    with pytest.raises(AttributeError):
        explain(model, x, "layer9")
    with pytest.raises(ValueError, match="eval mode"):
        explain(model.train(), x, "layer3")


# -- the real CIFAR-10 ResNet-56 -----------------------------------------------------------------

needs_sample = pytest.mark.skipif(not CIFAR_SAMPLE.is_dir(), reason=f"{CIFAR_SAMPLE} not found")
needs_resnet56 = pytest.mark.skipif(
    not (CIFAR_WEIGHTS / CIFAR_FILES["cifar10_resnet56"]).is_file(),
    reason="the CIFAR-10 ResNet-56 checkpoint is not in the shared data",
)


def needs_cifar(test: Callable[..., None]) -> Callable[..., None]:
    """The real checkpoint and test images (../shared/data, present in CI)."""
    return needs_shared(needs_sample(needs_resnet56(test)))


@pytest.fixture(scope="module")
def resnet56() -> nn.Module:
    from app.weights import load_into

    spec = build_catalog().get("cifar10_resnet56")
    model = spec.builder()
    load_into(model, CIFAR_WEIGHTS / CIFAR_FILES["cifar10_resnet56"])
    return frozen(model)


@pytest.fixture(scope="module")
def cifar_images() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, class-balanced selection: the first 20 files (by name) of each class folder."""
    spec = build_catalog().get("cifar10_resnet56")
    files = [
        f for label in spec.labels for f in sorted((CIFAR_SAMPLE / label).glob("*.jpg"))[:PER_CLASS]
    ]
    assert len(files) == PER_CLASS * len(spec.labels)
    pixels = torch.stack([spec.transform.pixels(Image.open(f).convert("RGB")) for f in files])
    return pixels, normalize(pixels, spec.transform.mean, spec.transform.std)


@pytest.fixture(scope="module")
def trained_maps(
    resnet56: nn.Module, cifar_images: tuple[torch.Tensor, torch.Tensor]
) -> Explanation:
    return explain(resnet56, cifar_images[1], "layer3")


def top1_scores(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).softmax(1).gather(1, classes[:, None]).squeeze(1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties sharing their average rank."""

    def ranks(v: torch.Tensor) -> np.ndarray:
        _, inverse, counts = np.unique(v.numpy().ravel(), return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        return (ends - (counts - 1) / 2.0)[inverse]

    return heatmap_similarity(ranks(a), ranks(b))


def maps_for_targets(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Maps of ``model`` for the given class of each image (one explain call per class)."""
    out = torch.empty(x.shape[0], x.shape[2], x.shape[3])
    for c in targets.unique().tolist():
        rows = (targets == c).nonzero().squeeze(1)
        got = explain(model, x[rows], "layer3", target=int(c))
        assert torch.equal(got.targets, torch.full_like(rows, c))
        out[rows] = got.heatmaps
    return out


@needs_cifar
def test_deletion_highest_ranked_pixels_hurt_most(
    resnet56: nn.Module,
    cifar_images: tuple[torch.Tensor, torch.Tensor],
    trained_maps: Explanation,
) -> None:
    x = cifar_images[1]
    n = x.shape[0]
    top1 = trained_maps.targets
    before = top1_scores(resnet56, x, top1)
    torch.testing.assert_close(trained_maps.scores, before)  # explain's scores: plain softmax

    order = trained_maps.heatmaps.flatten(1).argsort(dim=1, descending=True, stable=True)

    def greyed(pixels: torch.Tensor) -> torch.Tensor:
        """x with the given pixel indices (N, K) set to the normalisation mean (0 after it)."""
        mask = torch.zeros(n, 32 * 32, dtype=torch.bool).scatter_(1, pixels, True)
        return x.masked_fill(mask.view(n, 1, 32, 32), 0.0)

    gen = torch.Generator().manual_seed(0)
    corner = torch.randint(0, 32 - SIDE + 1, (n, 2), generator=gen)
    ys = corner[:, :1, None] + torch.arange(SIDE)[None, :, None]
    xs = corner[:, 1:, None] + torch.arange(SIDE)[None, None, :]
    square = (ys * 32 + xs).flatten(1)
    assert square.shape == (n, K)

    drop = {
        name: float((before - top1_scores(resnet56, greyed(idx), top1)).mean())
        for name, idx in [
            ("highest", order[:, :K]),
            ("lowest", order[:, -K:]),
            ("random square", square),
        ]
    }
    print(
        f"\ndeletion, {n} CIFAR-10 test images, ResNet-56, {K} px ({K / 1024:.1%}) greyed: "
        f"mean top-1 score {float(before.mean()):.3f}; mean drop "
        + ", ".join(f"{k} {v:.3f}" for k, v in drop.items())
        + f"; highest/lowest {drop['highest'] / drop['lowest']:.1f}x"
    )
    assert drop["highest"] > 0
    assert drop["highest"] >= 3 * drop["lowest"]
    assert drop["highest"] > drop["random square"]


@needs_cifar
def test_maps_do_not_survive_model_randomisation(
    resnet56: nn.Module,
    cifar_images: tuple[torch.Tensor, torch.Tensor],
    trained_maps: Explanation,
) -> None:
    x = cifar_images[1]
    top1 = trained_maps.targets
    spec = build_catalog().get("cifar10_resnet56")
    torch.manual_seed(0)
    randomised = frozen(spec.builder())  # the same architecture, freshly initialised
    # Both sides explain the trained model's top-1 class, through the same per-class calls, so the
    # weights are the only difference; the control also checks that a map does not depend on
    # which other images share its batch.
    rand_maps = maps_for_targets(randomised, x, top1)
    again = maps_for_targets(resnet56, x, top1)
    rho_random = [spearman(a, b) for a, b in zip(trained_maps.heatmaps, rand_maps, strict=True)]
    rho_again = [spearman(a, b) for a, b in zip(trained_maps.heatmaps, again, strict=True)]
    # A re-initialised net's map can be all zeros (no class evidence survives the ReLU); those
    # count as uncorrelated (0.0), so the bound is also held over the maps that are not flat.
    flat = (rand_maps.flatten(1).amax(1) == 0).numpy()
    rho_live = np.asarray(rho_random)[~flat]
    print(
        f"\nmodel randomisation, {x.shape[0]} images: mean Spearman trained vs re-initialised "
        f"{np.mean(rho_random):.3f} (median {np.median(rho_random):.3f}; {int(flat.sum())} flat "
        f"maps, {np.mean(rho_live):.3f} over the other {len(rho_live)}); "
        f"trained vs trained again {np.mean(rho_again):.4f}"
    )
    assert np.mean(rho_again) > 0.99
    # Bound: 0.3. Unrelated smooth maps still share some layout (objects sit in the centre of
    # CIFAR images, random filters respond to edges), so 0 is not the target; a map that keeps
    # its ranking after the weights are destroyed would be near the control's 1.
    assert np.mean(rho_random) < 0.3
    assert len(rho_live) >= len(rho_random) // 2 and np.mean(rho_live) < 0.3


@needs_cifar
def test_maps_are_deterministic_and_follow_the_target(
    resnet56: nn.Module, cifar_images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x = cifar_images[1][:8]
    first, second = explain(resnet56, x, "layer3"), explain(resnet56, x, "layer3")
    torch.testing.assert_close(first.heatmaps, second.heatmaps, rtol=0, atol=1e-6)
    assert torch.equal(first.targets, second.targets)
    # asking for another class explains another class: its map is a different one
    other = int((first.targets[0] + 1) % 10)
    forced = explain(resnet56, x[:1], "layer3", target=other)
    assert forced.targets.tolist() == [other]
    assert float(forced.scores[0]) < float(first.scores[0])  # not the top-1, so less probable
    assert heatmap_similarity(forced.heatmaps[0], first.heatmaps[0]) < 0.9


# -- the picture and the agreement number ---------------------------------------------------------


def test_overlay_png_is_the_input_size_hot_where_the_map_is() -> None:
    pixels = torch.full((3, 24, 40), 128, dtype=torch.uint8)
    heat = torch.zeros(24, 40)
    heat[:, :20] = 1.0  # left half: most relevant
    png = overlay_png(pixels, heat)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (40, 24)
    rgb = np.asarray(img).astype(int)
    left, right = rgb[:, :20].mean((0, 1)), rgb[:, 20:].mean((0, 1))
    assert left[0] > right[0] + 40  # jet: hot is red ...
    assert right[2] > left[2] + 40  # ... and cold is blue
    url = data_url(png)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == png
    with pytest.raises(ValueError, match="does not match"):
        overlay_png(pixels, torch.zeros(24, 24))


@needs_shared
def test_overlay_of_a_real_explanation_decodes_to_the_crop(tmp_path: Path) -> None:
    model = torchvision_model("resnet18")
    pixels, x = photo_batch("resnet18")
    got = explain(model, x[:1], "layer4")
    png = overlay_png(pixels[0], got.heatmaps[0])
    assert Image.open(io.BytesIO(png)).size == (224, 224)
    (tmp_path / "overlay.png").write_bytes(png)  # kept by pytest's tmp_path for a look


def test_heatmap_similarity_is_pearson_and_nan_safe() -> None:
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((8, 8)).astype(np.float32))
    b = torch.from_numpy(rng.random((8, 8)).astype(np.float32))
    assert heatmap_similarity(a, a) == pytest.approx(1.0)
    assert heatmap_similarity(a, 1 - a) == pytest.approx(-1.0)
    expected = float(np.corrcoef(a.numpy().ravel(), b.numpy().ravel())[0, 1])
    assert heatmap_similarity(a, b) == pytest.approx(expected, abs=1e-6)
    assert heatmap_similarity(a, torch.zeros(8, 8)) == 0.0
    assert heatmap_similarity(torch.ones(8, 8), torch.ones(8, 8)) == 0.0
    nan = a.clone()
    nan[0, 0] = float("nan")
    assert heatmap_similarity(nan, b) == 0.0
    with pytest.raises(ValueError, match="shape"):
        heatmap_similarity(a, torch.zeros(4, 4))


# -- cam_layer in a custom model's TOML entry -----------------------------------------------------


def custom_config(tmp_path: Path, cam_layer: str) -> Path:
    torch.manual_seed(0)
    torch.save(cifar_resnet(20).state_dict(), tmp_path / "r20.pt")
    (tmp_path / "labels.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    path = tmp_path / "models.toml"
    path.write_text(
        f"""
[models.mine]
arch = "cifar10_resnet20"
weights = "r20.pt"
labels = "labels.txt"
preprocess = "cifar"
{cam_layer}
"""
    )
    return path


def test_custom_model_names_its_cam_layer(tmp_path: Path) -> None:
    from app.catalog.custom import load_model_config

    (spec,) = load_model_config(custom_config(tmp_path, 'cam_layer = "layer2.2"'), set())
    assert spec.cam_layer == "layer2.2"
    got = explain(frozen(spec.builder()), torch.randn(1, 3, 32, 32), spec.cam_layer)
    assert got.heatmaps.shape == (1, 32, 32)
    (plain,) = load_model_config(custom_config(tmp_path, ""), set())
    assert plain.cam_layer is None  # then the architecture's default applies


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('cam_layer = "layer4"', "cam_layer 'layer4' is not a module of this model"),
        ('cam_layer = "layer3.9"', "cam_layer 'layer3.9' is not a module"),
        ("cam_layer = 3", "cam_layer must be a module path"),
        ('cam_layer = ""', "cam_layer must be a module path"),
        # a module that exists but gives no feature map to explain: the classifier
        ('cam_layer = "linear"', "cam_layer 'linear' gives shape (1, 10) for one 32x32 image"),
    ],
)
def test_bad_cam_layer_stops_startup_naming_file_entry_and_problem(
    tmp_path: Path, line: str, message: str
) -> None:
    from app.catalog.custom import ModelConfigError, load_model_config

    path = custom_config(tmp_path, line)
    with pytest.raises(ModelConfigError) as info:
        load_model_config(path, set())
    text = str(info.value)
    assert str(path) in text and "[models.mine]" in text and message in text
    if "gives" in message:  # names a module that can be explained instead
        assert "such as 'layer3'" in text, text
