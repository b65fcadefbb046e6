"""The C++ wrapper (IMGCLS_CPP_WRAPPER) against the Python one, model-only, on the CPU.

One process loads the model twice through the workers' own Runner, once per wrapper, then calls
the two in turn, a few batches each (--block), and reports per-batch times. Taking turns this way
cancels the drift of a shared machine's speed, which between separate processes (or runs of
seconds each) is larger than the difference measured here. It also reports where a forward pass
of the default (Python) graph spends its time, from torch's profiler: oneDNN's convolutions,
copies (for int8, mostly the clones inside PyTorch's fused residual convolutions), and the rest.
With --openvino, OpenVINO's CPU plugin then runs the same model alone, in a child process, right
after: one stream of the machine's threads, as imgcls runs; int8 by NNCF for an int8 model, its
best float precision otherwise; with its own split from its per-layer counters. (With
OpenVINO taking turns in one process, torch's passes ran slower than alone: not a clean
comparison.) The profiled
split is of 10 passes after the timed ones (OpenVINO's: its last pass), so it need not add up
to the timed mean.

    .venv/bin/python bench/cpp_wrapper.py --model resnet50:int8 --batch 8 --passes 150 --openvino
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app.catalog import build_catalog
from app.engine import fastpath
from app.engine.worker import Runner, WorkerConfig


def load(model: str, batch: int, cpp_wrapper: bool) -> tuple[Runner, float]:
    spec = build_catalog().get(model)
    fast = fastpath.resolve("auto", None, None, "cpu")
    cfg = WorkerConfig(0, "cpu", fast.precision, fast.channels_last, fast.compile,
                       os.cpu_count(), batch, [], cpp_wrapper=cpp_wrapper)  # fmt: skip
    runner = Runner(cfg)
    t0 = time.perf_counter()
    backend = runner.load(spec.load_plan(None))
    if backend != "inductor":
        raise SystemExit(f"{model} did not compile ({backend})")
    return runner, time.perf_counter() - t0


def profile(runner: Runner, model: str, x: torch.Tensor) -> dict[str, float]:
    """ms per forward pass by kind, from torch's profiler (10 passes)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(10):
            runner.forward(model, x)
    copies = "copies (int8: clones inside fused residual convolutions; the batch into the graph)"
    kinds = {"convolutions (oneDNN)": 0.0, copies: 0.0}
    total = 0.0
    for e in p.key_averages():
        ms = e.self_cpu_time_total / 1000 / 10
        total += ms
        if "conv" in e.key:
            kinds["convolutions (oneDNN)"] += ms
        elif e.key in ("aten::clone", "aten::copy_"):
            kinds[copies] += ms
    kinds["everything else (wrapper, other kernels)"] = total - sum(kinds.values())
    kinds["total (profiled)"] = total
    return {k: round(v, 2) for k, v in kinds.items()}


def openvino_request(model: str, batch: int) -> tuple[Any, str]:
    """OpenVINO's CPU plugin on the same model and input handling, one stream of the machine's
    threads (LATENCY hint, as imgcls runs one batch at a time), with per-layer counters; int8
    by NNCF for an int8 model, else its best float precision here."""
    import openvino as ov

    from app.benchmarks import openvino_peer
    from app.engine.worker import NormalizingModel

    plan = build_catalog().get(model.removesuffix(":int8")).load_plan(None)
    pre = plan.preprocess
    net = NormalizingModel(plan.builder().eval(), pre.mean, pre.std, torch.float32, False)
    size = plan.input_size
    core = ov.Core()
    with torch.no_grad():
        ov_model = ov.convert_model(
            net.eval(), example_input=torch.zeros(1, 3, size, size, dtype=torch.uint8)
        )
    if model.endswith(":int8"):
        ov_model = openvino_peer._quantize(ov_model, size)
    ov_model.reshape([batch, 3, size, size])
    config = {
        "INFERENCE_PRECISION_HINT": openvino_peer.best_precision(core),
        "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": "YES",
    }
    return core.compile_model(ov_model, "CPU", config).create_infer_request(), ov.get_version()


def openvino_split(request: Any) -> dict[str, float]:
    """ms of the last forward pass by kind, from OpenVINO's per-layer counters."""
    conv = other = 0.0
    for layer in request.profiling_info:
        ms = layer.real_time.total_seconds() * 1000
        if layer.node_type == "Convolution":
            conv += ms
        else:
            other += ms
    return {"convolutions": round(conv, 2), "other layers": round(other, 2)}


def summary(ts: list[float], batch: int) -> dict[str, Any]:
    ts = sorted(ts)
    mean = sum(ts) / len(ts)
    return {
        "passes": len(ts),
        "mean_ms": round(mean, 2),
        "median_ms": round(ts[len(ts) // 2], 2),
        "p10_ms": round(ts[len(ts) // 10], 2),
        "images_per_s": round(batch * 1000 / mean, 1),
    }


def openvino_alone(model: str, batch: int, passes: int) -> dict[str, Any]:
    """OpenVINO timed in this process, with nothing of torch's running (its child process)."""
    request, version = openvino_request(model, batch)
    size = build_catalog().get(model).input_size
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).numpy()
    for _ in range(3):
        request.infer({0: pixels})
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        request.infer({0: pixels})
        times.append((time.perf_counter() - t0) * 1000)
    return {"version": version, **summary(times, batch), "ms_by_kind": openvino_split(request)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50:int8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--passes", type=int, default=150)
    ap.add_argument("--block", type=int, default=5, help="forward passes per turn")
    ap.add_argument(
        "--openvino", action="store_true", help="then time OpenVINO alone, in a child process"
    )
    ap.add_argument("--openvino-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.block < 1 or args.passes < args.block:
        raise SystemExit("--block must be at least 1 and at most --passes")
    os.environ.setdefault("IMGCLS_ALLOW_RANDOM_WEIGHTS", "1")
    if args.openvino_child:
        print(json.dumps(openvino_alone(args.model, args.batch, args.passes)))
        return
    runners: dict[str, Runner] = {}
    load_s: dict[str, float] = {}
    for name, cpp in (("python", False), ("cpp", True)):
        runners[name], load_s[name] = load(args.model, args.batch, cpp)
    size = build_catalog().get(args.model).input_size
    x = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    for runner in runners.values():
        for _ in range(3):
            runner.forward(args.model, x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for _ in range(args.passes // args.block):  # blocks in turn: the machine's drift cancels
        for name in order:
            for _ in range(args.block):
                t0 = time.perf_counter()
                runners[name].forward(args.model, x)
                times[name].append((time.perf_counter() - t0) * 1000)
        order = order[1:] + order[:1]  # each goes first in its turn
    result: dict[str, Any] = {
        "model": args.model, "batch": args.batch, "block": args.block,
        "cpu_flags": fastpath.cpu_features().names(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip
    for name, ts in times.items():
        result[name] = {"load_and_compile_s": round(load_s[name], 1), **summary(ts, args.batch)}
    result["cpp_vs_python"] = round(result["python"]["mean_ms"] / result["cpp"]["mean_ms"], 3)
    result["python_forward_ms_by_kind"] = profile(runners["python"], args.model, x)
    if args.openvino:
        child = [sys.executable, __file__, "--openvino-child", "--model", args.model,
                 "--batch", str(args.batch), "--passes", str(args.passes)]  # fmt: skip
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        ov = result["openvino_alone"] = json.loads(out.strip().splitlines()[-1])
        result["python_vs_openvino"] = round(ov["mean_ms"] / result["python"]["mean_ms"], 3)
        result["cpp_vs_openvino"] = round(ov["mean_ms"] / result["cpp"]["mean_ms"], 3)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
