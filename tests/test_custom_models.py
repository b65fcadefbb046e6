"""Custom checkpoints declared in IMGCLS_MODEL_CONFIG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import get_model_builder

from app.catalog.custom import ModelConfigError, load_model_config
from app.preprocess import table_preset
from app.settings import Settings
from tests.conftest import IMAGES, ROOT, needs_shared, save_resnet18, shared_image


@needs_shared(IMAGES)
@pytest.mark.parametrize("image", ["chelsea.png", "rocket.jpg"])
def test_custom_checkpoint_matches_direct_run(client, model_dir, image):
    """tiny3: resnet18 with a 3-class head served through the config == the model run directly."""
    model = get_model_builder("resnet18")(weights=None, num_classes=3).eval()
    model.load_state_dict(torch.load(model_dir / "tiny3.pt", weights_only=True))
    transform = table_preset({"resize": 160, "crop": 128, "interpolation": "bilinear"})
    img = Image.open(IMAGES / image).convert("RGB")
    with torch.inference_mode():
        expected = torch.softmax(model(transform(img).unsqueeze(0)), 1)[0].numpy()
    r = client.post(
        "/classify", params={"model": "tiny3"}, files={"file": (image, shared_image(image))}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["predictions"]) == 3
    assert body["weights"] == "tiny3.pt"
    for p in body["predictions"]:
        assert p["label"] == ["ok", "scratch", "dent"][p["index"]]
        assert p["score"] == pytest.approx(float(expected[p["index"]]), abs=1e-3)
    assert [p["index"] for p in body["predictions"]] == np.argsort(-expected).tolist()


def test_custom_model_in_models(client):
    entry = client.get("/models/tiny3").json()
    assert entry["source"] == "custom" and entry["family"] == "resnet"
    assert entry["depth"] == 18 and entry["params"] == 11_178_051
    assert entry["input_size"] == 128 and entry["labels"] == ["ok", "scratch", "dent"]


def _write(tmp: Path, body: str) -> Path:
    p = tmp / "models.toml"
    p.write_text(body)
    return p


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    save_resnet18(tmp_path / "m.pt", num_classes=3)
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(3, 512)}}, tmp_path / "keys.pt")
    return tmp_path / "m.pt"


ENTRY = '[models.x]\narch = "resnet18"\nweights = "m.pt"\nlabels = "three.txt"\n'
BAD_CASES = {
    "missing weights file": (
        '[models.x]\narch = "resnet18"\nweights = "nope.pt"\nlabels = "three.txt"\n',
        "nope.pt does not exist",
    ),
    "missing labels file": (
        '[models.x]\narch = "resnet18"\nweights = "m.pt"\nlabels = "nope.txt"\n',
        "nope.txt does not exist",
    ),
    "width mismatch": (
        '[models.x]\narch = "resnet18"\nweights = "m.pt"\nlabels = "four.txt"\n',
        "shape mismatch",
    ),
    "unknown arch": (
        '[models.x]\narch = "resnet9000"\nweights = "m.pt"\nlabels = "three.txt"\n',
        "unknown arch 'resnet9000'",
    ),
    "wrong keys": (
        '[models.x]\narch = "resnet18"\nweights = "keys.pt"\nlabels = "three.txt"\n',
        "keys do not match",
    ),
    "unknown preprocess": (
        ENTRY + 'preprocess = "x"\n',
        "preprocess must be",
    ),
    "unknown key": (
        '[models.x]\narch = "resnet18"\nweights = "m.pt"\nlabels = "three.txt"\nlr = 1\n',
        "unknown keys ['lr']",
    ),
    "builtin name": (
        '[models.resnet18]\narch = "resnet18"\nweights = "m.pt"\nlabels = "three.txt"\n',
        "taken by a built-in",
    ),
    "not toml": ("[models.x\n", "not valid TOML"),
    "leading dot name": (
        '[models.".."]\narch = "resnet18"\nweights = "m.pt"\nlabels = "three.txt"\n',
        "starts with a letter, digit or _",
    ),
    "leading dash name": (
        '[models.-x]\narch = "resnet18"\nweights = "m.pt"\nlabels = "three.txt"\n',
        "starts with a letter, digit or _",
    ),
    "preprocess nan std": (
        ENTRY + "preprocess = {resize = 32, std = [0.2, 0.2, nan]}\n",
        "std values must be finite",
    ),
    "preprocess inf mean": (
        ENTRY + "preprocess = {resize = 32, mean = [inf, 0.4, 0.4]}\n",
        "mean values must be finite",
    ),
    "preprocess text std": (
        ENTRY + 'preprocess = {resize = 32, std = "0.2"}\n',
        "std needs three numbers",
    ),
    "preprocess crop over resize": (
        ENTRY + "preprocess = {resize = 32, crop = 64}\n",
        "crop (64) must not be larger than resize (32)",
    ),
    "preprocess resize true": (
        ENTRY + "preprocess = {resize = true}\n",
        "resize must be a whole number of pixels",
    ),
    "preprocess resize zero": (
        ENTRY + "preprocess = {resize = 0}\n",
        "resize must be a whole number of pixels",
    ),
    "preprocess resize fraction": (
        ENTRY + "preprocess = {resize = 32.7}\n",
        "resize must be a whole number of pixels",
    ),
    "preprocess resize list of text": (
        ENTRY + 'preprocess = {resize = ["a", "b"]}\n',
        "resize must be a whole number of pixels",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_config_names_file_entry_and_problem(tmp_path, ckpt, case):
    body, problem = BAD_CASES[case]
    path = _write(tmp_path, body)
    with pytest.raises(ModelConfigError) as info:
        load_model_config(path, {"resnet18"})
    msg = str(info.value)
    assert str(path) in msg and problem in msg
    if case != "not toml":
        assert "[models." in msg


def test_whole_float_sizes_load(tmp_path, ckpt):
    """TOML's 256.0 is a whole number of pixels (as ``int()`` read it before the checks)."""
    path = _write(tmp_path, ENTRY + "preprocess = {resize = 40.0, crop = 32.0}\n")
    (spec,) = load_model_config(path, set())
    assert spec.input_size == 32


def test_good_config_loads(tmp_path, ckpt):
    path = _write(
        tmp_path,
        '[models.x]\narch = "resnet18"\nweights = "m.pt"\nlabels = "three.txt"\n'
        'preprocess = "cifar"\n',
    )
    (spec,) = load_model_config(path, set())
    assert spec.name == "x" and spec.num_classes == 3 and spec.input_size == 32


def test_bad_config_stops_startup(tmp_path, ckpt):
    """The service refuses to start (uvicorn exits non-zero) and says why."""
    path = _write(tmp_path, BAD_CASES["width mismatch"][0])
    env = {
        "IMGCLS_MODEL_CONFIG": str(path),
        "IMGCLS_MODELS": "x",
        "IMGCLS_AUTO_DOWNLOAD": "0",
        "PATH": "/usr/bin:/bin",
    }
    r = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert str(path) in r.stderr and "[models.x]" in r.stderr and "shape mismatch" in r.stderr


def test_settings_rejects_default_not_in_models():
    with pytest.raises(ValueError, match="IMGCLS_DEFAULT_MODEL"):
        Settings(models="resnet18", default_model="vgg16")
