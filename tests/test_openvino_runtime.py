"""IMGCLS_CPU_RUNTIME=openvino: OpenVINO's CPU plugin runs the CPU workers' models.

Real OpenVINO, real CIFAR-10 ResNets on the real CIFAR-10 sample: the converted models pass the
same accuracy guards as torch's fast paths (tests/guard.py; int8 by the issue's bound), report
the precision that ran, take any batch size and already-normalised float input, and serve over
real HTTP beside explanations, which stay in torch. A model OpenVINO cannot convert is served by
torch instead.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import itertools
import json
import sys
import weakref
from pathlib import Path

import httpx
import numpy as np
import openvino as ov
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from app.catalog import build_catalog
from app.engine.openvino import OpenVINOModel, in_halves
from app.engine.worker import Runner, WorkerConfig
from app.evaluate import list_images
from app.preprocess import normalize
from app.settings import Settings
from tests import guard
from tests.conftest import (
    CIFAR_FILES,
    CIFAR_SAMPLE,
    CIFAR_WEIGHTS,
    needs_shared,
    run_service,
    shared_image,
)
from tests.test_int8 import (
    INT8_MAX_MOVE,
    INT8_MIN_AGREEMENT,
    _published_resnet18,
    calibrated_case,
)

R20 = "cifar10_resnet20"


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, np.ndarray]:
    spec = build_catalog().get(R20)
    items = list_images(CIFAR_SAMPLE)
    x = torch.stack([spec.transform.pixels(Image.open(p).convert("RGB")) for p, _ in items])
    y = np.array([spec.labels.index(label) for _, label in items])
    return x, y


def _runner(precision: str, runtime: str = "openvino", threads: int = 2, **kw: object) -> Runner:
    config = WorkerConfig(0, "cpu", precision, False, False, threads, 16, [], runtime=runtime, **kw)  # type: ignore[arg-type]
    return Runner(config)


def _forward_in_odd_batches(runner: Runner, name: str, x: torch.Tensor) -> np.ndarray:
    """Every batch size a worker may send (one compiled model takes them all)."""
    out, start, sizes = [], 0, itertools.cycle((50, 33, 17, 9, 5, 3, 2, 1))
    while start < len(x):
        n = next(sizes)
        out.append(runner.forward(name, x[start : start + n]))
        start += n
    return torch.cat(out).numpy()


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
@pytest.mark.parametrize("model", list(CIFAR_FILES))
def test_openvino_float_paths_pass_the_accuracy_guard(data, model):
    """fp32 answers as torch's fp32 eager does, to float rounding; bf16 (where OpenVINO's CPU
    plugin has bf16 kernels for this CPU; else it reports and runs fp32) passes the guard."""
    x, y = data
    checkpoint = str(CIFAR_WEIGHTS / CIFAR_FILES[model])
    plan = build_catalog().get(model).load_plan(checkpoint)
    reference = _runner("fp32", runtime="torch")
    assert reference.load(plan) == "eager"
    ref = guard.forward(reference, model, x).numpy()
    for precision in ("fp32", "bf16"):
        runner = _runner(precision)
        assert runner.load(plan) == "openvino"
        served = runner.models[model]
        assert isinstance(served, OpenVINOModel)
        compiled = served._requests[torch.uint8].whole.get_compiled_model()
        ran = compiled.get_property("INFERENCE_PRECISION_HINT")  # what OpenVINO compiled
        assert runner.precisions[model] == {ov.Type.f32: "fp32", ov.Type.bf16: "bf16"}[ran]
        if precision == "fp32":
            assert ran == ov.Type.f32
        elif "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            assert ran == ov.Type.bf16
        del served, compiled
        got = _forward_in_odd_batches(runner, model, x)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)
        if runner.precisions[model] == "fp32":
            np.testing.assert_allclose(got, ref, atol=1e-4)
        guard.check(f"{model} openvino {precision}", got.argmax(1), ref.argmax(1), y)
        gone = weakref.ref(runner.models[model])
        runner.unload(model)
        gc.collect()
        assert model not in runner.models and gone() is None  # nothing keeps it


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
@pytest.mark.parametrize("model", ["cifar10_resnet20", "cifar10_resnet56"])
def test_openvino_calibrated_int8_guard(tmp_path: Path, model: str):
    """Calibrated on 500 real CIFAR-10 test images (torch.ao's observers), converted to
    OpenVINO's int8 and evaluated on the other 500: top-1 agrees with fp32 on >= 98% and the
    number correct moves by at most 5 of the 500, the bound torch's int8 paths are held to."""
    int8, checkpoint, x, y, ref = calibrated_case(tmp_path, model)
    runner = _runner("bf16")
    assert runner.load(int8.load_plan(checkpoint)) == "openvino"
    assert runner.precisions == {int8.name: "int8"}
    got = _forward_in_odd_batches(runner, int8.name, x).argmax(1)
    guard.check(
        f"{model} int8 (calibrated, OpenVINO)", got, ref, y,
        min_agreement=INT8_MIN_AGREEMENT, max_move=INT8_MAX_MOVE,
    )  # fmt: skip


def test_openvino_runs_torchvisions_int8_model_as_torch_does(tmp_path: Path):
    """``resnet18:int8`` is torchvision's quantized model, loaded from a file saved as
    torchvision publishes its int8 weights (random ones: the real ones cannot be downloaded on
    this machine). OpenVINO converts its quantize, int8 convolution and dequantize ops and
    answers as torch's int8 kernels do, within their rounding of the same integers."""
    file = tmp_path / "resnet18_fbgemm.pth"
    _published_resnet18(file)
    plan = build_catalog().get("resnet18:int8").load_plan(str(file))
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 224, 224), dtype=torch.uint8)
    reference = _runner("fp32", runtime="torch")
    assert reference.load(plan) == "eager"
    ref = reference.forward(plan.name, x)
    runner = _runner("fp32")
    assert runner.load(plan) == "openvino"
    assert runner.precisions[plan.name] == "int8"
    got = runner.forward(plan.name, x)
    assert got.shape == ref.shape == (6, 1000)
    # random weights spread the probabilities thin (~1e-3 each): compare them relative to
    # their size, and the classes each ranks first
    # (AMD EPYC: 3.4% of the largest; a float model with other weights: 250%)
    assert (got - ref).abs().max() <= 0.1 * ref.max()
    assert (got.argmax(1) == ref.argmax(1)).all()


@needs_shared(CIFAR_WEIGHTS)
def test_float_input_gets_a_model_of_its_own():
    """Already-normalised float32 images (/v2's FP32 PIXELS) run through a second converted
    model, made on the first such batch from the same weights, and answer as the same pixels
    sent as uint8. A reload in place frees the first model and both of its compiled ones."""
    spec = build_catalog().get(R20)
    plan = spec.load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES[R20]))
    runner = _runner("fp32")
    runner.load(plan)
    model = runner.models[R20]
    assert isinstance(model, OpenVINOModel)
    assert set(model._requests) == {torch.uint8}  # only the uint8 model, made at load
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    pre = runner.preprocess[R20]
    as_floats = runner.forward(R20, normalize(x, pre.mean, pre.std))
    assert set(model._requests) == {torch.uint8, torch.float32}
    np.testing.assert_allclose(as_floats.numpy(), runner.forward(R20, x).numpy(), atol=1e-5)
    first = weakref.ref(model)
    del model
    assert runner.load(plan) == "openvino"  # in place
    gc.collect()
    assert first() is None and runner.models[R20] is not None


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
def test_batches_run_in_halves_on_two_streams(data):
    """A worker of two threads compiles a second model of two one-thread streams: a batch whose
    halves are near equal runs there as two halves at once (the second half's output is its
    own size) and answers as the one-stream model does, in order; a single image and batches
    of 3 or 5 (2 + 1, 3 + 2) run on the one stream. A batch that fails (a wrong image size)
    fails alone on either path. A worker of one thread compiles no second model."""
    assert [n for n in range(1, 12) if in_halves(n)] == [2, 4, 6, 7, 8, 9, 10, 11]
    x, _ = data
    plan = build_catalog().get(R20).load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES[R20]))
    runner = _runner("fp32")
    assert runner.load(plan) == "openvino"
    model = runner.models[R20]
    assert isinstance(model, OpenVINOModel)
    compiled = model._requests[torch.uint8]
    assert len(compiled.halves) == 2
    assert compiled.whole.get_compiled_model().get_property("NUM_STREAMS") == 1
    assert compiled.halves[0].get_compiled_model().get_property("NUM_STREAMS") == 2
    first = runner.forward(R20, x[:4]).numpy()
    for n in (2, 7, 64):
        batch = x[:n]
        got = runner.forward(R20, batch).numpy()
        assert compiled.halves[1].get_output_tensor(0).shape[0] == n // 2  # ran in halves
        whole = compiled.whole.infer({0: batch.numpy()})[0]
        np.testing.assert_allclose(got, whole, atol=1e-5)
        assert (got.argmax(1) == whole.argmax(1)).all()
    for n in (1, 3, 5):
        before = compiled.halves[0].get_output_tensor(0).shape[0]
        runner.forward(R20, x[:n])
        assert compiled.whole.get_output_tensor(0).shape[0] == n
        assert compiled.halves[0].get_output_tensor(0).shape[0] == before  # not run
    for n in (1, 4):  # a batch that fails fails alone, on either path: the next one runs
        with pytest.raises(RuntimeError):
            runner.forward(R20, torch.zeros(n, 3, 33, 33, dtype=torch.uint8))
        np.testing.assert_allclose(runner.forward(R20, x[:n]).numpy(), first[:n], atol=1e-5)
    one = _runner("fp32", threads=1)
    assert one.load(plan) == "openvino"
    single = one.models[R20]
    assert isinstance(single, OpenVINOModel)
    assert single._requests[torch.uint8].halves == []
    np.testing.assert_allclose(
        one.forward(R20, x[:64]).numpy(), runner.forward(R20, x[:64]).numpy(), atol=1e-5
    )


class _Bessel(nn.Module):
    """A real model with an op OpenVINO has no conversion for (torch.special.i0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(x).mean(dim=(2, 3))
        return self.fc(torch.special.i0(pooled))


def test_a_model_openvino_cannot_convert_is_served_by_torch(caplog):
    plan = dataclasses.replace(
        build_catalog().get(R20).load_plan(None), name="bessel", builder=_Bessel
    )
    runner = _runner("fp32")
    with caplog.at_level("WARNING", logger="imgcls.worker"):
        assert runner.load(plan) == "eager"
    assert "OpenVINO cannot serve bessel" in caplog.text
    assert not isinstance(runner.models["bessel"], OpenVINOModel)
    assert runner.precisions["bessel"] == "fp32"
    out = runner.forward("bessel", torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert out.shape == (2, 10)


def test_the_setting_names_the_package_when_openvino_is_missing(monkeypatch):
    assert Settings(cpu_runtime="openvino").cpu_runtime == "openvino"
    with pytest.raises(ValidationError, match="cpu_runtime"):
        Settings(cpu_runtime="onnx")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(ValidationError, match=r"pip install 'imgcls\[openvino\]'"):
        Settings(cpu_runtime="openvino")
    # a GPU host never runs a CPU worker: the setting does nothing there, and needs nothing
    assert Settings(cpu_runtime="openvino", device="cuda").cpu_runtime == "openvino"


@needs_shared(CIFAR_WEIGHTS)
def test_openvino_serves_over_http_and_explains_in_torch(tmp_path: Path):
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    file = CIFAR_FILES[R20]
    (weights_dir / file).symlink_to(CIFAR_WEIGHTS / file)
    cat = shared_image("chelsea.png")
    spec = build_catalog().get(R20)
    x = spec.transform(Image.open(io.BytesIO(cat)).convert("RGB")).numpy()[None]  # normalised
    head = json.dumps(
        {"inputs": [{"name": "PIXELS", "shape": list(x.shape), "datatype": "FP32",
                     "parameters": {"binary_data_size": x.nbytes}}]}
    ).encode()  # fmt: skip
    with run_service(
        models=R20, weights_dir=weights_dir, cpu_runtime="openvino", max_batch_size="auto"
    ) as svc:
        r = httpx.post(f"{svc.url}/classify", files={"file": ("c.png", cat)}, timeout=60)
        assert r.status_code == 200, r.text
        entry = httpx.get(f"{svc.url}/models/{R20}").json()
        e = httpx.post(f"{svc.url}/explain", files={"file": ("c.png", cat)}, timeout=60)
        assert e.status_code == 200, e.text
        v2 = httpx.post(
            f"{svc.url}/v2/models/{R20}/infer",
            content=head + x.astype("<f4").tobytes(),
            headers={"Inference-Header-Content-Length": str(len(head))},
            timeout=60,
        )
        assert v2.status_code == 200, v2.text
    body = r.json()
    assert body["backend"] == entry["backend"] == "openvino"
    assert body["precision"] == entry["precision"] == "fp32"
    assert entry["batch_size"] in (1, 2, 4, 8, 16, 32)  # measured at load (auto), on OpenVINO
    probs = v2.json()["outputs"][0]["data"]  # the float model, made on this first FP32 batch
    assert len(probs) == 10
    assert spec.labels[int(np.argmax(probs))] == "cat"
    assert body["predictions"][0]["label"] == "cat"  # the pretrained net's answer for Chelsea
    assert e.json()["target"]["label"] == "cat"  # Grad-CAM in torch, on the same weights
    with run_service(models=R20, weights_dir=weights_dir) as svc:  # torch's answer
        t = httpx.post(f"{svc.url}/classify", files={"file": ("c.png", cat)}, timeout=60).json()
    assert t["backend"] == "eager"
    ours = {p["label"]: p["score"] for p in body["predictions"]}
    theirs = {p["label"]: p["score"] for p in t["predictions"]}
    assert ours.keys() == theirs.keys()
    for label, score in ours.items():
        assert score == pytest.approx(theirs[label], abs=1e-4)
