"""Accuracy guard for the fast paths: reduced precision and torch.compile must agree with fp32
eager on real images (real CIFAR-10 ResNets, cifar10-test-sample), by tests/guard.py: top-1
agreement >= 99% and accuracy moved by at most 5 of the 1,000 images (counts, not percentages)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.catalog import build_catalog
from app.engine.fastpath import cpu_has_bf16, resolve
from app.engine.worker import Runner, WorkerConfig
from app.evaluate import list_images
from tests import guard
from tests.conftest import CIFAR_FILES, CIFAR_SAMPLE, CIFAR_WEIGHTS, needs_shared, run_service

PATHS = {
    "bf16-eager": ("bf16", True, False),
    "bf16-compiled": ("bf16", True, True),
    "fp32-compiled": ("fp32", False, True),
}


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, np.ndarray]:
    spec = build_catalog().get("cifar10_resnet20")
    items = list_images(CIFAR_SAMPLE)
    # uint8 pixels, as the service sends them: normalisation runs in the (compiled) model
    x = torch.stack([spec.transform.pixels(Image.open(p).convert("RGB")) for p, _ in items])
    y = np.array([spec.labels.index(label) for _, label in items])
    return x, y


def _predict(model: str, path: tuple[str, bool, bool], x: torch.Tensor) -> np.ndarray:
    spec = build_catalog().get(model)
    precision, channels_last, compile_ = path
    cfg = WorkerConfig(0, "cpu", precision, channels_last, compile_, 2, 50, [])
    runner = Runner(cfg)
    plan = spec.load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES[model]))
    backend = runner.load(plan)
    assert backend == ("inductor" if compile_ else "eager")
    return torch.cat([runner.forward(model, x[i : i + 50]) for i in range(0, len(x), 50)]).numpy()


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
@pytest.mark.parametrize("model", list(CIFAR_FILES))
def test_fast_paths_agree_with_fp32_eager(data, model):
    x, y = data
    reference = _predict(model, ("fp32", False, False), x)
    assert len(y) == 1000, f"expected the 1,000-image sample, found {len(y)}"
    for name, path in PATHS.items():
        guard.check(f"{model} {name}", _predict(model, path, x).argmax(1), reference.argmax(1), y)


def test_defaults_follow_the_hardware():
    cpu = resolve("auto", None, None, "cpu")
    assert cpu.precision == ("bf16" if cpu_has_bf16() else "fp32")
    assert cpu.compile == cpu.channels_last == (cpu.precision != "fp32")
    assert resolve("auto", None, None, "cuda:0") == resolve("fp16", True, True, "cuda:0")
    assert resolve("bf16", False, False, "cpu").compile is False
    with pytest.raises(ValueError, match="fp16"):
        resolve("fp16", None, None, "cpu")


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
def test_default_path_over_http_says_what_ran(tmp_path: Path):
    """The service with default settings: responses and /models name precision and backend."""
    (tmp_path / "resnet20-12fca82f.th").symlink_to(CIFAR_WEIGHTS / "resnet20-12fca82f.th")
    with run_service(
        models="cifar10_resnet20", weights_dir=tmp_path, precision="auto", compile=None
    ) as svc:
        expected = resolve("auto", None, None, "cpu")
        img = next(CIFAR_SAMPLE.glob("cat/*.jpg")).read_bytes()
        r = httpx.post(
            f"{svc.url}/classify",
            params={"model": "cifar10_resnet20"},
            files={"file": ("c.jpg", img)},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["precision"] == expected.precision
        assert body["backend"] == ("inductor" if expected.compile else "eager")
        entry = httpx.get(f"{svc.url}/models/cifar10_resnet20").json()
        assert (entry["precision"], entry["backend"]) == (body["precision"], body["backend"])
