"""`imgcls bench`: one model on one device, measured side by side in a single run.

1. model-only: the engine's ceiling (best batch size) and batch-1 latency, in-process;
2. imgcls over HTTP with real JPEG uploads under closed-loop concurrency;
3. a naive FastAPI baseline (one fp32 eager forward per request, in a thread);
4. LitServe serving the same model with the same precision and its own batching;
5. the ratios. Printed as a table, saved as JSON and a plot of throughput and p99 against
   concurrency.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from app.benchmarks.common import free_port, jpeg_corpus, start_server, stop_server
from app.benchmarks.loadgen import LoadResult, run_load
from app.catalog import build_catalog
from app.engine import fastpath
from app.engine.worker import Runner, WorkerConfig


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_bf16": fastpath.cpu_has_bf16(),
        "cpu_features": fastpath.cpu_features().names(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def model_only(
    model: str, device: str, precision: str, batch_sizes: list[int], seconds: float = 5.0
) -> dict[str, Any]:
    """Throughput per batch size and batch-1 latency of the same Runner the workers use."""
    spec = build_catalog().get(model)
    fast = fastpath.resolve(precision, None, None, device)
    cfg = WorkerConfig(0, device, fast.precision, fast.channels_last, fast.compile,
                       os.cpu_count(), max(batch_sizes), [])  # fmt: skip
    runner = Runner(cfg)
    t0 = time.perf_counter()
    backend = runner.load(spec.load_plan(None))
    load_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    size = spec.input_size
    per_batch: dict[int, float] = {}
    for bs in batch_sizes:  # uint8 pixels, as the workers get them (normalised in the model)
        x = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8)
        if device.startswith("cuda"):
            x = x.pin_memory()
        runner.forward(model, x)
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            runner.forward(model, x)
            n += bs
        sync()
        per_batch[bs] = round(n / (time.perf_counter() - start), 2)
    x1 = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        runner.forward(model, x1)
        sync()
        times.append((time.perf_counter() - t) * 1000.0)
    best = max(per_batch, key=lambda b: per_batch[b])
    del runner
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "precision": fast.precision,
        "channels_last": fast.channels_last,
        "backend": backend,
        "load_and_warmup_s": round(load_s, 1),
        "images_per_s_by_batch": per_batch,
        "best_batch": best,
        "best_images_per_s": per_batch[best],
        "batch1_latency_ms": round(sorted(times)[len(times) // 2], 2),
        "gflops_per_image": spec.gflops,
    }


def _servers(
    model: str, device: str, precision: str, max_batch: int, api_workers: int
) -> dict[str, tuple[list[str], dict[str, str], str, str]]:
    """name -> (python args, env, health path, upload format); ports filled in at start."""
    imgcls_env = {
        "IMGCLS_MODELS": model,
        "IMGCLS_DEVICE": device,
        "IMGCLS_PRECISION": precision,
        "IMGCLS_ALLOW_RANDOM_WEIGHTS": "1",
        "IMGCLS_AUTO_DOWNLOAD": "0",
        "IMGCLS_MAX_BATCH_SIZE": str(max_batch),
        "IMGCLS_LOG_LEVEL": "warning",
    }
    return {
        "imgcls": (
            ["-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--log-level", "warning",
             "--no-access-log", "--workers", str(api_workers)],
            imgcls_env, "/readyz", "multipart",
        ),
        "naive": (
            ["-m", "app.benchmarks.naive", "--model", model, "--device", device], {}, "/health",
            "multipart",
        ),
        "litserve": (
            ["-m", "app.benchmarks.litserve_peer", "--model", model, "--device", device,
             "--precision", precision, "--max-batch-size", str(max_batch)],
            {}, "/health", "json",
        ),
    }  # fmt: skip


def run_bench(
    model: str = "resnet50",
    device: str = "cpu",
    precision: str = "auto",
    concurrency: tuple[int, ...] = (1, 4, 16, 32),
    duration_s: float = 15.0,
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32, 64),
    servers: tuple[str, ...] = ("imgcls", "naive", "litserve"),
    max_batch: int | None = None,
    api_workers: int = 1,
    client_processes: int = 1,
    model_seconds: float = 5.0,
    out: Path = Path("bench-results"),
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    images = jpeg_corpus()
    result: dict[str, Any] = {
        "model": model,
        "device": device,
        "machine": machine(),
        "settings": {
            "duration_s": duration_s,
            "concurrency": list(concurrency),
            "max_batch": max_batch,
            "api_workers": api_workers,
            "client_processes": client_processes,
            "upload_bytes_mean": int(sum(map(len, images)) / len(images)),
        },
    }
    if model_seconds > 0:
        print(f"== {model} on {device}: model-only", flush=True)
        result["model_only"] = model_only(
            model, device, precision, list(batch_sizes), model_seconds
        )
        print(json.dumps(result["model_only"]), flush=True)
    else:  # HTTP only (the ceiling measured in another run)
        result["model_only"] = {
            "best_batch": max_batch or 32, "best_images_per_s": float("nan"),
            "precision": precision, "backend": "-", "batch1_latency_ms": None,
        }  # fmt: skip
    result["http"] = {}
    if max_batch is None:  # serve with the batch size the engine runs best at on this machine
        max_batch = int(result["model_only"]["best_batch"])
    result["settings"]["max_batch"] = max_batch
    defs = _servers(model, device, precision, max_batch, api_workers)
    for name in servers:
        args, env, health, upload = defs[name]
        port = free_port()
        print(f"== {name}: starting", flush=True)
        proc = start_server([*args, "--port", str(port)], env, f"http://127.0.0.1:{port}{health}")
        try:
            rows: list[LoadResult] = []
            for c in concurrency:
                r = run_load(
                    f"http://127.0.0.1:{port}", images, c, duration_s,
                    processes=client_processes, upload=upload,
                )  # fmt: skip
                print(
                    f"   {name} c={c}: {r.images_per_s} img/s, p50 {r.p50_ms} ms, "
                    f"p99 {r.p99_ms} ms, batch {r.mean_batch}, errors {r.errors}",
                    flush=True,
                )
                rows.append(r)
            result["http"][name] = [asdict(r) for r in rows]
        finally:
            stop_server(proc)
    result["ratios"] = ratios(result)
    (out / f"bench-{model}-{device.replace(':', '')}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"bench-{model}-{device.replace(':', '')}.png")
    print(table(result))
    return result


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return max(rows, key=lambda r: r["images_per_s"])


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    http = result["http"]
    out: dict[str, Any] = {}
    if "imgcls" not in http:
        return out
    ours = _best(http["imgcls"])
    out["service_vs_model_only"] = round(
        ours["images_per_s"] / result["model_only"]["best_images_per_s"], 3
    )
    for peer in ("naive", "litserve"):
        if peer in http:
            theirs = _best(http[peer])
            if not theirs["images_per_s"]:
                continue
            out[f"service_vs_{peer}"] = round(ours["images_per_s"] / theirs["images_per_s"], 3)
            same_c = {r["concurrency"]: r for r in http[peer] if r["images_per_s"]}
            out[f"{peer}_at_same_concurrency"] = [
                {
                    "concurrency": r["concurrency"],
                    "throughput_ratio": round(
                        r["images_per_s"] / same_c[r["concurrency"]]["images_per_s"], 3
                    ),
                    "p99_ratio": round(r["p99_ms"] / same_c[r["concurrency"]]["p99_ms"], 3),
                }
                for r in http["imgcls"] if r["concurrency"] in same_c
            ]  # fmt: skip
    gflops = result["model_only"].get("gflops_per_image")
    if gflops:
        out["model_only_tflops"] = round(
            result["model_only"]["best_images_per_s"] * gflops * 2 / 1000, 3
        )
    return out


def table(result: dict[str, Any]) -> str:
    mo = result["model_only"]
    hw = result["machine"].get("gpu") or result["machine"]["cpu"]
    head = ["server", "conc", "img/s", "p50 ms", "p95 ms", "p99 ms", "batch", "errors"]
    lines = [
        f"{result['model']} on {result['device']} ({hw})",
        "cpu features: " + (", ".join(result["machine"].get("cpu_features", [])) or "none"),
        f"model-only ({mo['precision']}, {mo['backend']}): best {mo['best_images_per_s']} img/s "
        f"at batch {mo['best_batch']}; batch-1 latency {mo['batch1_latency_ms']} ms",
        f"{head[0]:<10} " + " ".join(f"{h:>9}" for h in head[1:]),
    ]
    for name, rows in result["http"].items():
        for r in rows:
            lines.append(
                f"{name:<10} {r['concurrency']:>9} {r['images_per_s']:>9.1f} {r['p50_ms']:>9.1f} "
                f"{r['p95_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['mean_batch'] or '-':>9} "
                f"{r['errors']:>9}"
            )
    lines.append("ratios: " + json.dumps(result["ratios"]))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, rows in result["http"].items():
        c = [r["concurrency"] for r in rows]
        a.plot(c, [r["images_per_s"] for r in rows], marker="o", label=name)
        b.plot(c, [r["p99_ms"] for r in rows], marker="o", label=name)
    a.axhline(
        result["model_only"]["best_images_per_s"], ls="--", c="gray", label="model-only ceiling"
    )
    for ax, title in ((a, "throughput (images/s)"), (b, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    b.set_yscale("log")
    hw = result["machine"].get("gpu") or result["machine"]["cpu"]
    fig.suptitle(f"{result['model']} on {result['device']}: {hw}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
