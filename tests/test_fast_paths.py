"""Accuracy guard for the fast paths: reduced precision and torch.compile must agree with fp32
eager on real images (real CIFAR-10 ResNets, cifar10-test-sample), by tests/guard.py: top-1
agreement >= 99% and accuracy moved by at most 5 of the 1,000 images (counts, not percentages)."""

from __future__ import annotations

import gc
import itertools
import os
import weakref
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
from app.preprocess import normalize
from tests import guard
from tests.conftest import CIFAR_FILES, CIFAR_SAMPLE, CIFAR_WEIGHTS, needs_shared, run_service

PATHS = {
    "bf16-eager": ("bf16", True, False),
    "bf16-compiled": ("bf16", True, True),
    "fp32-compiled": ("fp32", True, True),  # channels-last: the default without bf16
}


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, np.ndarray]:
    spec = build_catalog().get("cifar10_resnet20")
    items = list_images(CIFAR_SAMPLE)
    # uint8 pixels, as the service sends them: normalisation runs in the (compiled) model
    x = torch.stack([spec.transform.pixels(Image.open(p).convert("RGB")) for p, _ in items])
    y = np.array([spec.labels.index(label) for _, label in items])
    return x, y


def _predict(
    model: str, path: tuple[str, bool, bool], x: torch.Tensor, max_batch: int = 50
) -> np.ndarray:
    spec = build_catalog().get(model)
    precision, channels_last, compile_ = path
    cfg = WorkerConfig(0, "cpu", precision, channels_last, compile_, 2, max_batch, [])
    runner = Runner(cfg)
    plan = spec.load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES[model]))
    backend = runner.load(plan)
    assert backend == ("inductor" if compile_ else "eager")
    # batches of every size the compiled graphs come in (one frozen graph per batch size on
    # the CPU: 1, 2, 4, ... up to max_batch), padded or split as the worker runs them
    cycle = (50, 33, 17, 9, 5, 3, 2, 1) if max_batch >= 50 else (8, 5, 3, 2, 1)
    out, start, sizes = [], 0, itertools.cycle(cycle)
    while start < len(x):
        n = next(sizes)
        out.append(runner.forward(model, x[start : start + n]))
        start += n
    assert runner.backends[model] == backend  # the compiled graphs answered, not a fallback
    return torch.cat(out).numpy()


def _paths(model: str) -> dict[str, tuple[tuple[str, bool, bool], int]]:
    """What each model is guarded on: every fast path, with graphs up to batch 50 for the
    smallest model and up to 8 for the deeper ones (each size is a compile of its own, 3-5 s
    warm and twice that with a cold inductor cache, as in CI; the graphs of one model differ
    only in their batch dimension, and test_cpu_float_models_run_one_frozen_graph_per_batch_size
    checks them against eager). On a CPU without native bf16 (AVX2 only), where bf16 is
    emulated at about a fifth of fp32's speed and ``auto`` never chooses it, bf16 is guarded on
    the smallest net, compiled up to batch 8: the arithmetic is the same as with native bf16
    (bf16 products are exact in fp32, accumulated in fp32), and every CPU with bf16 guards it
    on all four nets."""
    names = list(CIFAR_FILES)
    first = names[0]
    native_bf16 = cpu_has_bf16()
    paths = {}
    for name, path in PATHS.items():
        if path[0] == "bf16" and not native_bf16:
            if model == first:
                paths[name] = (path, 8)
        else:
            paths[name] = (path, 50 if model == first else 8)
    return paths


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
@pytest.mark.parametrize("model", list(CIFAR_FILES))
def test_fast_paths_agree_with_fp32_eager(data, model):
    x, y = data
    reference = _predict(model, ("fp32", False, False), x)
    assert len(y) == 1000, f"expected the 1,000-image sample, found {len(y)}"
    for name, (path, max_batch) in _paths(model).items():
        got = _predict(model, path, x, max_batch).argmax(1)
        guard.check(f"{model} {name}", got, reference.argmax(1), y)


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
def test_batch_norm_folding_keeps_the_answers(data):
    """Every float model is served with batch norm folded into its convolutions (in fp32, before
    any cast): on the real CIFAR-10 nets it answers as the unfolded model does, to float
    rounding, and no batch norm is left in what runs."""
    from app.engine.checkpoint import load_into
    from app.engine.worker import NormalizingModel

    x, _ = data
    for model in CIFAR_FILES:
        plan = build_catalog().get(model).load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES[model]))
        plain = plan.builder()
        load_into(plain, Path(plan.weights_path))
        pre = plan.preprocess
        plain = NormalizingModel(plain.eval(), pre.mean, pre.std, torch.float32, False)
        runner = Runner(WorkerConfig(0, "cpu", "fp32", False, False, 2, 50, []))
        runner.load(plan)
        served = runner.models[model]
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.modules()), model
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
        with torch.inference_mode():
            want = torch.cat([plain(x[i : i + 100]) for i in range(0, len(x), 100)])
        got = torch.cat([runner.forward(model, x[i : i + 100]) for i in range(0, len(x), 100)])
        assert torch.equal(got.argmax(1), want.argmax(1)), model
        assert (got - want).abs().max().item() < 1e-4, model


def test_every_compiled_model_on_a_worker_is_compiled(monkeypatch):
    """With dynamic shapes (float models on CUDA; here forced on the CPU), all models on one
    worker share one compiled code object, and dynamo caches a bounded number of graphs per code
    object; past it, it ran the next models eagerly while they were reported as inductor. The
    worker makes room for each model it compiles, and a model that would still run eagerly is
    reported as eager."""
    import torch._dynamo

    from app.engine import worker

    monkeypatch.setattr(worker, "_static_graphs", lambda device: False)
    catalog = build_catalog()
    names = ["cifar10_resnet20", "cifar10_plain20"]  # random weights: only the graphs matter
    # config.patch, not monkeypatch: undoing a monkeypatch on dynamo's config deletes the
    # setting, and every later compile in the process fails on it
    torch._dynamo.reset()  # other tests' graphs count towards the same limit
    with torch._dynamo.config.patch(recompile_limit=2):  # room for one model
        runner = Runner(WorkerConfig(0, "cpu", "fp32", False, True, 1, 4, []))
        assert [runner.load(catalog.get(n).load_plan(None)) for n in names] == ["inductor"] * 2
        runner.unload(names[0])  # an unloaded model's graphs still count: a reload has room too
        assert runner.load(catalog.get(names[0]).load_plan(None)) == "inductor"

        assert not isinstance(runner.models[names[1]], worker.Bucketed)

    torch._dynamo.reset()
    monkeypatch.setattr(worker, "_allow_compiled_graphs", lambda graphs: None)
    with torch._dynamo.config.patch(recompile_limit=2):
        runner = Runner(WorkerConfig(0, "cpu", "fp32", False, True, 1, 4, []))
        loaded = [runner.load(catalog.get(n).load_plan(None)) for n in names]
        assert loaded == ["inductor", "eager"]
        x = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
        assert runner.forward(names[1], x).shape == (3, 10)  # served, eagerly
    torch._dynamo.reset()  # leave no graphs of this test to the next


def _frozen(generated: list) -> bool:
    """Inductor froze the weights: constants of the generated code, not inputs to it."""
    calls = [module for module in generated if hasattr(module, "call")]
    return bool(calls) and all(any(n.startswith("_frozen_param") for n in vars(m)) for m in calls)


@needs_shared(CIFAR_WEIGHTS)
def test_cpu_float_models_run_one_frozen_graph_per_batch_size():
    """On the CPU a compiled float model runs one graph per batch size, on frozen weights
    (``Bucketed``), and answers as the eager model; the graphs above the batch size the model
    settles on are dropped with their copies of the weights, and a larger batch is split into
    the sizes kept."""
    from app.engine import worker

    spec = build_catalog().get("cifar10_resnet20")
    plan = spec.load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES["cifar10_resnet20"]))
    runner = Runner(WorkerConfig(0, "cpu", "fp32", False, True, 1, 8, []))
    assert runner.load(plan) == "inductor"
    bucketed = runner.models[plan.name]
    assert isinstance(bucketed, worker.Bucketed) and bucketed.sizes == (1, 2, 4, 8)
    graphs = {size: bucketed._graphs[size] for size in bucketed.sizes}
    assert all(graph.generated for graph in graphs.values())  # each compiled on its own
    assert all(_frozen(graph.generated) for graph in graphs.values())
    x = torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8)
    eager = Runner(WorkerConfig(0, "cpu", "fp32", False, False, 1, 8, []))
    eager.load(plan)
    want = eager.forward(plan.name, x)
    torch.testing.assert_close(runner.forward(plan.name, x), want, rtol=1e-4, atol=1e-5)

    # already normalised float32 input (/v2's PIXELS): each size compiles for it once, frozen
    # too, and its modules are noted with the graph's (freed with it)
    floats = normalize(x, plan.preprocess.mean, plan.preprocess.std)
    before = {size: len(graph.generated) for size, graph in graphs.items()}
    torch.testing.assert_close(runner.forward(plan.name, floats), want, rtol=1e-4, atol=1e-5)
    assert runner.backends[plan.name] == "inductor" and not bucketed.fell_back
    assert bucketed._plan(11) == [(0, 8, 8), (8, 3, 4)]  # 3 padded to 4
    assert all(len(graphs[s].generated) > before[s] for s in (4, 8))
    assert all(len(graphs[s].generated) == before[s] for s in (1, 2))
    assert _frozen(graphs[8].generated)  # the float32 graphs too

    dropped = [weakref.ref(m) for s in (4, 8) for m in graphs[s].generated]
    kept = [weakref.ref(m) for s in (1, 2) for m in graphs[s].generated]
    del graphs
    bucketed.keep(2)
    gc.collect()
    assert bucketed.sizes == (1, 2)
    assert [ref() for ref in dropped] == [None] * len(dropped)
    assert all(ref() is not None for ref in kept)
    assert bucketed._plan(11) == [(i, 2, 2) for i in range(0, 10, 2)] + [(10, 1, 1)]
    torch.testing.assert_close(runner.forward(plan.name, x), want, rtol=1e-4, atol=1e-5)
    assert not bucketed.fell_back

    auto = Runner(WorkerConfig(0, "cpu", "fp32", False, True, 1, 8, [], auto_batch=True))
    assert auto.load(plan) == "inductor"
    served = auto.models[plan.name]
    assert isinstance(served, worker.Bucketed)
    assert max(served.sizes) == auto.batch_sizes[plan.name]  # nothing above it is kept
    assert all(_frozen(served._graphs[size].generated) for size in served.sizes)


def test_a_graph_failing_while_the_batch_size_is_measured_leaves_eager(monkeypatch):
    """With auto batch sizes, the measurement compiles the sizes it times; if one fails, the
    model is served (and reported, and measured again) as eager, its graphs dropped."""
    from app.engine import worker

    run = worker._Graph.__call__

    def fails_at_2(self: worker._Graph, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 2:
            raise RuntimeError("a compiled kernel failed")
        return run(self, x)

    monkeypatch.setattr(worker._Graph, "__call__", fails_at_2)
    spec = build_catalog().get("cifar10_resnet20")  # random weights: only the path matters
    plan = spec.load_plan(None)
    runner = Runner(WorkerConfig(0, "cpu", "fp32", False, True, 1, 8, [], auto_batch=True))
    assert runner.load(plan) == "eager"
    assert runner.backends[plan.name] == "eager"
    assert not isinstance(runner.models[plan.name], worker.Bucketed)
    assert runner.batch_sizes[plan.name] in (1, 2, 4, 8)
    x = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    assert runner.forward(plan.name, x).shape == (3, 10)


def test_defaults_follow_the_hardware(monkeypatch):
    """``auto`` on a CPU: bf16 where the CPU has it in hardware, else fp32; compiled and
    channels-last either way (compiled fp32 is the fastest guarded path without bf16). An
    explicit fp32 stays eager."""
    from app.engine import fastpath

    cpu = resolve("auto", None, None, "cpu")
    assert cpu.precision == ("bf16" if cpu_has_bf16() else "fp32")
    assert cpu.compile is cpu.channels_last is True
    for bf16 in (True, False):
        monkeypatch.setattr(fastpath, "cpu_has_bf16", lambda bf16=bf16: bf16)
        precision = "bf16" if bf16 else "fp32"
        assert resolve("auto", None, None, "cpu") == resolve(precision, True, True, "cpu")
        assert resolve("auto", None, False, "cpu").compile is False  # IMGCLS_COMPILE=0 holds
    assert resolve("fp32", None, None, "cpu") == resolve("fp32", False, False, "cpu")
    assert resolve("auto", None, None, "cuda:0") == resolve("fp16", True, True, "cuda:0")
    assert resolve("fp32", None, None, "cuda:0").compile is False
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


def _cpp_wrapped(generated: list) -> bool:
    """The generated code calls its kernels from compiled C++ (inductor's cpp_wrapper)."""
    calls = [module for module in generated if hasattr(module, "call")]
    return bool(calls) and all(hasattr(module, "cpp_wrapper_src") for module in calls)


@needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE)
def test_cpp_wrapper_runs_the_same_graphs_from_cpp(data):
    """IMGCLS_CPP_WRAPPER: every batch size's graph calls its kernels from compiled C++ (and
    only then), the graphs answer as the Python-wrapped ones do on real CIFAR-10 images (the
    same kernels run), and unloading frees the generated code with its copy of the weights."""
    x, _ = data
    x = x[:120]
    model = "cifar10_resnet20"
    plan = build_catalog().get(model).load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES[model]))
    precision = "bf16" if cpu_has_bf16() else "fp32"  # the default compiled path here
    out: dict[bool, torch.Tensor] = {}
    for cpp in (False, True):
        cfg = WorkerConfig(0, "cpu", precision, True, True, 2, 4, [], cpp_wrapper=cpp)
        runner = Runner(cfg)
        assert runner.load(plan) == "inductor"
        bucketed = runner.models[model]
        graphs = bucketed._graphs.values()
        assert bucketed.sizes == (1, 2, 4)
        assert all(_cpp_wrapped(g.generated) == cpp for g in graphs), f"cpp_wrapper={cpp}"
        pieces, start, sizes = [], 0, itertools.cycle((4, 3, 2, 1))  # 3: padded to 4
        while start < len(x):
            n = next(sizes)
            pieces.append(runner.forward(model, x[start : start + n]))
            start += n
        assert runner.backends[model] == "inductor" and not bucketed.fell_back
        out[cpp] = torch.cat(pieces)
        generated = [weakref.ref(m) for m in bucketed.generated]
        del bucketed, graphs
        runner.unload(model)
        gc.collect()
        assert [ref() for ref in generated] == [None] * len(generated)
    assert torch.equal(out[True].argmax(1), out[False].argmax(1))
    torch.testing.assert_close(out[True], out[False], rtol=0, atol=1e-3)


RUNNER_SETTINGS = {  # the settings a worker's Runner runs by, each away from its default
    "IMGCLS_PRECISION": "fp32",
    "IMGCLS_CHANNELS_LAST": "1",
    "IMGCLS_COMPILE": "1",
    "IMGCLS_CPP_WRAPPER": "1",
    "IMGCLS_CPU_RUNTIME": "openvino",
    "IMGCLS_DECODE": "api",
    "IMGCLS_JPEG_DRAFT": "0",
    "IMGCLS_MAX_BATCH_SIZE": "8",
    "IMGCLS_MAX_PIXELS": "1000000",
    "IMGCLS_THREADS_PER_WORKER": "1",
    "IMGCLS_WORKERS_PER_DEVICE": "2",
}


def test_every_runner_setting_reaches_every_worker(monkeypatch):
    """The settings a worker runs by reach each of the service's worker configurations, from
    one place (``WorkerConfig.from_settings``, which Ray's replicas, the bench's model-only and
    LitServe's peer use too). IMGCLS_CPP_WRAPPER is off by default (it makes compiling 1.6-2.3x
    as long)."""
    from app.service import Service
    from app.settings import Settings

    for var in RUNNER_SETTINGS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("IMGCLS_MODELS", "cifar10_resnet20")
    monkeypatch.setenv("IMGCLS_DEVICE", "cpu")
    (default,) = Service(Settings())._configs([])
    bf16 = cpu_has_bf16()
    assert (default.precision, default.compile) == ("bf16" if bf16 else "fp32", True)
    assert not default.cpp_wrapper and default.runtime == "torch"
    assert default.jpeg_on_device and default.jpeg_draft and default.auto_batch
    assert (default.warmup_batch, default.max_pixels) == (32, 40_000_000)

    for var, value in RUNNER_SETTINGS.items():
        monkeypatch.setenv(var, value)
    settings = Settings()
    configs = Service(settings)._configs([])
    assert [c.worker_id for c in configs] == [0, 1]
    for c in configs:
        assert (c.device, c.precision, c.channels_last, c.compile) == ("cpu", "fp32", True, True)
        assert c.cpp_wrapper and c.runtime == "openvino"
        assert not c.jpeg_on_device and not c.jpeg_draft and not c.auto_batch
        assert (c.warmup_batch, c.max_pixels, c.threads) == (8, 1_000_000, 1)
    assert WorkerConfig.from_settings(settings, "cpu", worker_id=1, threads=1) == configs[1]
    # the bench's model-only: its own precision and largest batch, every size kept
    bench = WorkerConfig.from_settings(
        settings, "cpu", auto_batch=False, precision="bf16", warmup_batch=64
    )
    assert (bench.precision, bench.warmup_batch, bench.auto_batch) == ("bf16", 64, False)
    assert bench.runtime == "openvino" and bench.cpp_wrapper


def test_workers_decode_on_their_share_of_the_cores(monkeypatch):
    """A CPU worker decodes uploads on its own threads; a GPU worker (torch's default: a thread
    per core) on its share of the host's cores, so that eight GPU workers do not each decode on
    every core. A CPU service's configurations carry it through ``from_settings``."""
    from app.service import Service, decode_threads
    from app.settings import Settings

    assert decode_threads("cpu", 16, 2) is None  # its own threads
    assert [decode_threads(f"cuda:{i}", 64, 8) for i in range(8)] == [8] * 8
    assert decode_threads("cuda:0", 16, 1) == 16
    assert decode_threads("cuda:0", 4, 8) == 1

    for var in RUNNER_SETTINGS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("IMGCLS_MODELS", "cifar10_resnet20")
    monkeypatch.setenv("IMGCLS_DEVICE", "cpu")
    monkeypatch.setenv("IMGCLS_WORKERS_PER_DEVICE", "2")
    configs = Service(Settings())._configs([])
    share = max(1, (os.cpu_count() or 1) // 2)
    assert [(c.threads, c.decode_threads) for c in configs] == [(share, None)] * 2
    for c in configs:  # the pool the worker's decoder runs on
        assert Runner(c).decoder().pool._max_workers == share
    gpu_like = WorkerConfig.from_settings(Settings(), "cpu", threads=1, decode_threads=3)
    assert Runner(gpu_like).decoder().pool._max_workers == 3
