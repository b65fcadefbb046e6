"""`imgcls bench`: one model on one device, measured side by side in a single run.

1. model-only: the engine's ceiling (best batch size) and batch-1 latency, in-process;
   optionally at several precisions (fp32, bf16, int8), and OpenVINO's runtime on the same model
   (app/benchmarks/openvino_peer.py);
2. imgcls over HTTP with real JPEG uploads under closed-loop concurrency, one upload set per size
   (small, ImageNet-size, phone-size: common.IMAGE_SETS);
3. a naive FastAPI baseline (one fp32 eager forward per request, in a thread);
4. LitServe serving the same model with the same precision and its own batching;
5. the ratios. Printed as a table, saved as JSON and a plot of throughput and p99 against
   concurrency.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from app.benchmarks.common import (
    APP_DIR,
    IMAGE_SETS,
    SERVERS,
    check_plan,
    free_port,
    image_set,
    out_folder,
    start_server,
    stop_server,
)
from app.benchmarks.loadgen import run_load
from app.catalog import build_catalog
from app.engine import fastpath
from app.engine.worker import Runner, WorkerConfig
from app.settings import Settings


def machine() -> dict[str, Any]:
    """The machine a run measured. ``cpu_id`` (x86 family/model/stepping) tells apart CPUs that
    a virtual machine names alike: "AMD EPYC" is Zen 3 (family 25, model 1), Zen 4 (family 25,
    model 17) or Zen 5 (family 26), whose AVX-512 runs at different widths."""
    cpu = platform.processor() or platform.machine()
    ident: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                cpu = value.strip()
            elif key in ("cpu family", "model", "stepping") and key not in ident:
                ident[key] = value.strip()
            elif not key and ident:  # the first processor's block has ended
                break
    except OSError:
        pass
    if "cpu family" not in ident:  # not x86 (POWER's "model" is the machine's)
        ident = {}
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_id": " ".join(f"{k.split()[-1]} {v}" for k, v in ident.items()) or None,
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
    model: str,
    device: str,
    precision: str,
    batch_sizes: list[int],
    seconds: float = 5.0,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Throughput per batch size and batch-1 latency of the same Runner the workers use (with
    IMGCLS_CPP_WRAPPER and IMGCLS_CPU_RUNTIME as the servers it is compared with get them;
    ``runtime`` overrides the latter)."""
    spec = build_catalog().get(model)
    settings = Settings()
    # The engine's own fast path (compiled where it compiles), whatever IMGCLS_COMPILE the
    # servers run with (bench/gpu.sh serves eager); every batch size timed keeps its graph.
    update: dict[str, Any] = {"compile": None, "channels_last": None}
    if runtime:
        update["cpu_runtime"] = runtime
    cfg = WorkerConfig.from_settings(
        settings.model_copy(update=update), device, threads=os.cpu_count(), auto_batch=False,
        precision=precision, warmup_batch=max(batch_sizes),
    )  # fmt: skip
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
    precision = runner.precisions[model]  # the model's own (int8) or the worker's
    del runner
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "precision": precision,
        # int8: channels-last only when compiled (the PT2E graph, for oneDNN); OpenVINO picks
        # its own layouts
        "channels_last": backend != "openvino"
        and (cfg.channels_last if precision != "int8" else backend == "inductor"),
        "backend": backend,
        "load_and_warmup_s": round(load_s, 1),
        "images_per_s_by_batch": per_batch,
        "best_batch": best,
        "best_images_per_s": per_batch[best],
        "batch1_latency_ms": round(sorted(times)[len(times) // 2], 2),
        "gflops_per_image": spec.gflops,
    }


def _servers(
    model: str,
    device: str,
    precision: str,
    max_batch: int,
    api_workers: int,
    int8_max_batch: int | None = None,
) -> dict[str, tuple[list[str], dict[str, str], str, str]]:
    """name -> (python args, env, health path, upload format); ports filled in at start.
    ``imgcls-int8`` serves ``MODEL:int8`` (random int8 weights where none are present) with
    ``int8_max_batch`` (default ``max_batch``): each engine at the batch size it runs best at."""
    imgcls_env = {
        "IMGCLS_MODELS": model,
        "IMGCLS_DEVICE": device,
        "IMGCLS_PRECISION": precision,
        "IMGCLS_ALLOW_RANDOM_WEIGHTS": "1",
        "IMGCLS_AUTO_DOWNLOAD": "0",
        "IMGCLS_MAX_BATCH_SIZE": str(max_batch),
        "IMGCLS_LOG_LEVEL": "warning",
        "IMGCLS_GRPC_PORT": "0",  # HTTP is measured; a fixed gRPC port could be taken
    }
    # the imgcls this harness is part of, wherever the benchmark runs from (uvicorn puts its
    # --app-dir, the current folder by default, first on the path: an ``app`` there would win)
    uvicorn = ["-m", "uvicorn", "app.main:app", "--app-dir", APP_DIR, "--host", "127.0.0.1",
               "--log-level", "warning", "--no-access-log",
               "--workers", str(api_workers)]  # fmt: skip
    return {
        "imgcls": (uvicorn, imgcls_env, "/readyz", "multipart"),
        "imgcls-int8": (
            uvicorn,
            {
                **imgcls_env,
                "IMGCLS_MODELS": f"{model}:int8",
                "IMGCLS_MAX_BATCH_SIZE": str(int8_max_batch or max_batch),
            },
            "/readyz",
            "multipart",
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


def _model_only_name(
    model: str, precision: str, setting: str = "auto", served: str | None = None
) -> tuple[str, str]:
    """(model name, precision argument) for a model-only run at ``precision``. int8 is a model
    variant (``MODEL:int8``), the other precisions a worker setting. int8, and the precision
    the servers run (``served``, what ``setting`` resolves to), run with the servers' setting,
    whose defaults decide compile as the servers' do (``auto``: compiled fp32 without bf16)."""
    if precision == "int8":
        return f"{model}:int8", setting
    return model, setting if precision == served else precision


def check_target(model: str, device: str) -> None:
    """ValueError, in one line, for a model not in the catalog or a device not here."""
    from app.catalog.registry import UnknownModelError
    from app.engine.pool import resolve_devices

    try:
        build_catalog().get(model)
    except UnknownModelError as exc:
        raise ValueError(f"--model: {exc}") from None
    try:
        torch.device(device)
        resolve_devices(device)
    except RuntimeError as exc:
        said = str(exc).replace(f"IMGCLS_DEVICE={device} but ", "")
        raise ValueError(f"--device {device}: {said}") from None


def run_bench(
    model: str = "resnet50",
    device: str = "cpu",
    precision: str = "auto",
    concurrency: tuple[int, ...] = (1, 4, 16, 32),
    duration_s: float = 6.0,
    batch_sizes: tuple[int, ...] = (1, 8, 16, 32),
    servers: tuple[str, ...] = ("imgcls", "naive", "litserve"),
    max_batch: int | None = None,
    api_workers: int = 1,
    client_processes: int = 1,
    model_seconds: float = 3.0,
    out: Path = Path("bench-results"),
    image_sets: tuple[str, ...] = ("small", "imagenet", "phone"),
    model_precisions: tuple[str, ...] = (),
    openvino: bool = True,
    warmup_s: float = 2.0,
    images: Path | None = None,
) -> dict[str, Any]:
    """Everything in one run; HTTP time is bounded by servers x sets x client counts x
    (warm-up + duration), printed before it starts. An unknown model or server, a device that
    is not there, a folder of photos that is not there or an output folder that cannot be made
    is a ValueError before anything runs."""
    check_target(model, device)
    folder = check_plan(servers, max_batch, model_seconds, images, out)
    out_folder(out, "--out")
    uploads = {name: image_set(name, folder) for name in image_sets}
    result: dict[str, Any] = {
        "model": model,
        "device": device,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": _loadavg(),
        "settings": {
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "concurrency": list(concurrency),
            "max_batch": max_batch,
            "api_workers": api_workers,
            "client_processes": client_processes,
        },
        "image_sets": {
            name: {
                "width": IMAGE_SETS[name][0],
                "height": IMAGE_SETS[name][1],
                "jpeg_quality": IMAGE_SETS[name][2],
                "images": len(data),
                "upload_bytes_mean": int(sum(map(len, data)) / len(data)),
            }
            for name, data in uploads.items()
        },
    }
    served = fastpath.resolve(precision, None, None, device).precision
    if model_seconds > 0:
        by_precision: dict[str, Any] = {}
        for prec in dict.fromkeys([served, *model_precisions]):
            name, prec_arg = _model_only_name(model, prec, precision, served)
            print(f"== {name} on {device}: model-only ({prec})", flush=True)
            by_precision[prec] = model_only(
                name, device, prec_arg, list(batch_sizes), model_seconds
            )
            print(json.dumps(by_precision[prec]), flush=True)
        result["model_only"] = by_precision[served]
        result["model_only_by_precision"] = by_precision
    else:  # HTTP only (the ceiling measured in another run)
        result["model_only"] = {
            "best_batch": max_batch or 32, "best_images_per_s": float("nan"),
            "precision": served, "backend": "-", "batch1_latency_ms": None,
        }  # fmt: skip
        result["model_only_by_precision"] = {}
    if openvino and model_seconds > 0 and not device.startswith("cuda"):
        from app.benchmarks import openvino_peer

        peers = {"openvino": ("", False)}
        if "int8" in result["model_only_by_precision"]:  # its int8 beside imgcls's
            peers["openvino_int8"] = (", int8 (NNCF)", True)
        for key, (what, int8) in peers.items():
            print(f"== {model}: OpenVINO model-only{what}", flush=True)
            try:
                result[key] = openvino_peer.model_only(
                    model, list(batch_sizes), model_seconds, int8=int8
                )
            except Exception as exc:  # a conversion it cannot do is a result, not a crash
                result[key] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(result[key]), flush=True)
    result["http"] = {}
    int8_max_batch = max_batch
    if max_batch is None:  # serve with the batch size each engine runs best at on this machine
        max_batch = int(result["model_only"]["best_batch"])
        int8_mo = result["model_only_by_precision"].get("int8")
        int8_max_batch = int(int8_mo["best_batch"]) if int8_mo else max_batch
    result["settings"]["max_batch"] = max_batch
    result["settings"]["max_batch_int8"] = int8_max_batch
    points = len(servers) * len(uploads) * len(concurrency)
    print(
        f"== HTTP: {points} points, {points * (warmup_s + duration_s):.0f} s of load "
        "(plus server start-up)",
        flush=True,
    )
    defs = _servers(model, device, precision, max_batch, api_workers, int8_max_batch)
    assert set(defs) == set(SERVERS)
    result["failed_servers"] = {}
    for name in servers:
        args, env, health, upload = defs[name]
        port = free_port()
        print(f"== {name}: starting", flush=True)
        try:
            proc = start_server(
                [*args, "--port", str(port)], env, f"http://127.0.0.1:{port}{health}"
            )
        except (RuntimeError, TimeoutError) as exc:  # one peer missing must not lose the run
            result["failed_servers"][name] = str(exc)[-600:]
            print(f"   {name} did not start: {str(exc)[-300:]}", flush=True)
            continue
        try:
            rows: list[dict[str, Any]] = []
            for set_name, set_uploads in uploads.items():
                for c in concurrency:
                    r = run_load(
                        f"http://127.0.0.1:{port}", set_uploads, c, duration_s, warmup_s=warmup_s,
                        processes=client_processes, upload=upload,
                    )  # fmt: skip
                    print(
                        f"   {name} {set_name} c={c}: {r.images_per_s} img/s, p50 {r.p50_ms} ms, "
                        f"p99 {r.p99_ms} ms, batch {r.mean_batch}, errors {r.errors}",
                        flush=True,
                    )
                    rows.append({"image_set": set_name, **asdict(r)})
            result["http"][name] = rows
        finally:
            stop_server(proc)
    result["ratios"] = ratios(result)
    stem = f"bench-{model}-{device.replace(':', '')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{stem}.png")
    print(table(result))
    return result


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return max(rows, key=lambda r: r["images_per_s"])


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b or b != b:  # missing, zero or NaN
        return None
    return round(a / b, 3)


def _set_ratios(result: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The issue's targets for one upload set: against the ceiling, the peers, and the tail."""
    out: dict[str, Any] = {}
    ours = rows["imgcls"]
    best = _best(ours)
    ceiling = result["model_only"]["best_images_per_s"]
    out["service_vs_model_only"] = _ratio(best["images_per_s"], ceiling)
    by_c = {r["concurrency"]: r for r in ours}
    if 16 in by_c:
        out["service_vs_model_only_at_16"] = _ratio(by_c[16]["images_per_s"], ceiling)
    top = max(by_c)
    out["p99_over_p50_at_max_clients"] = {
        "concurrency": top, "ratio": _ratio(by_c[top]["p99_ms"], by_c[top]["p50_ms"])
    }  # fmt: skip
    for peer in ("naive", "litserve"):
        if peer not in rows:
            continue
        theirs = _best(rows[peer])
        out[f"service_vs_{peer}"] = _ratio(best["images_per_s"], theirs["images_per_s"])
        same_c = {r["concurrency"]: r for r in rows[peer] if r["images_per_s"]}
        out[f"{peer}_at_same_concurrency"] = [
            {
                "concurrency": r["concurrency"],
                "throughput_ratio": _ratio(r["images_per_s"], p["images_per_s"]),
                "p99_ratio": _ratio(r["p99_ms"], p["p99_ms"]),
            }
            for r in ours if (p := same_c.get(r["concurrency"]))
        ]  # fmt: skip
    if "imgcls-int8" in rows:
        int8 = _best(rows["imgcls-int8"])
        if "naive" in rows:
            out["int8_service_vs_naive"] = _ratio(
                int8["images_per_s"], _best(rows["naive"])["images_per_s"]
            )
        int8_mo = result.get("model_only_by_precision", {}).get("int8")
        if int8_mo:
            out["int8_service_vs_model_only"] = _ratio(
                int8["images_per_s"], int8_mo["best_images_per_s"]
            )
    return out


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    sets: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, rows in result["http"].items():
        for r in rows:
            sets.setdefault(r.get("image_set", "default"), {}).setdefault(name, []).append(r)
    out: dict[str, Any] = {}
    by_set = {s: _set_ratios(result, rows) for s, rows in sets.items() if "imgcls" in rows}
    if by_set:
        out["by_set"] = by_set
    if "phone" in sets and "imagenet" in sets:
        for name in ("imgcls", "imgcls-int8", "naive", "litserve"):
            if name in sets["phone"] and name in sets["imagenet"]:
                out[f"{name}_phone_vs_imagenet"] = _ratio(
                    _best(sets["phone"][name])["images_per_s"],
                    _best(sets["imagenet"][name])["images_per_s"],
                )
    ov = result.get("openvino") or {}
    if ov.get("available"):
        same = {"bf16": "bf16", "f32": "fp32"}.get(ov["precision"])
        mo = result.get("model_only_by_precision", {}).get(same or "")
        if mo:
            out["model_only_vs_openvino_same_precision"] = {
                "precision": ov["precision"],
                "ratio": _ratio(mo["best_images_per_s"], ov["best_images_per_s"]),
            }
    ov8 = result.get("openvino_int8") or {}
    mo8 = result.get("model_only_by_precision", {}).get("int8")
    if ov8.get("available") and mo8:
        out["model_only_int8_vs_openvino_int8"] = _ratio(
            mo8["best_images_per_s"], ov8["best_images_per_s"]
        )
    gflops = result["model_only"].get("gflops_per_image")
    ceiling = result["model_only"]["best_images_per_s"]
    if gflops and not math.isnan(ceiling):
        out["model_only_tflops"] = round(ceiling * gflops * 2 / 1000, 3)
    return out


def _hardware(result: dict[str, Any]) -> str:
    """What the run measured on: the GPU for a CUDA run, else the CPU (and its x86 identity)."""
    m = result["machine"]
    if str(result["device"]).startswith("cuda") and m.get("gpu"):
        return str(m["gpu"])
    return f"{m['cpu']}, {m['cpu_id']}" if m.get("cpu_id") else str(m["cpu"])


def table(result: dict[str, Any]) -> str:
    mo = result["model_only"]
    hw = _hardware(result)
    lines = [
        f"{result['model']} on {result['device']} ({hw}), load average at start "
        f"{result.get('load_average_at_start')}",
        "cpu features: " + (", ".join(result["machine"].get("cpu_features", [])) or "none"),
        "model-only images/s by batch size:",
    ]
    peers = dict(result.get("model_only_by_precision") or {"served": mo})
    for prec, m in peers.items():
        by_batch = ", ".join(f"{b}: {v}" for b, v in m.get("images_per_s_by_batch", {}).items())
        lines.append(
            f"  imgcls {prec} ({m['backend']}): best {m['best_images_per_s']} at batch "
            f"{m['best_batch']}; batch-1 latency {m['batch1_latency_ms']} ms [{by_batch}]"
        )
    for ov in (result.get("openvino"), result.get("openvino_int8")):
        if ov is None:
            continue
        if ov.get("available"):
            by_batch = ", ".join(f"{b}: {v}" for b, v in ov["images_per_s_by_batch"].items())
            lines.append(
                f"  OpenVINO {ov['precision']} ({ov['performance_hint']}, {ov['infer_requests']} "
                f"requests): best {ov['best_images_per_s']} at batch {ov['best_batch']} "
                f"[{by_batch}]"
            )
        else:
            lines.append(f"  OpenVINO: not measured ({ov['reason']})")
    for name, info in result.get("image_sets", {}).items():
        lines.append(
            f"uploads {name}: {info['width']}x{info['height']} JPEG q{info['jpeg_quality']}, "
            f"{info['images']} photos, {info['upload_bytes_mean']} bytes on average"
        )
    st = result.get("settings", {})
    if st.get("max_batch") is not None:
        lines.append(f"batch limit: {st['max_batch']} (imgcls-int8: {st.get('max_batch_int8')})")
    head = ["server", "set", "conc", "img/s", "p50 ms", "p95 ms", "p99 ms", "batch", "errors"]
    lines.append(f"{head[0]:<12} {head[1]:<9} " + " ".join(f"{h:>8}" for h in head[2:]))
    for name, rows in result["http"].items():
        for r in rows:
            lines.append(
                f"{name:<12} {r.get('image_set', '-'):<9} {r['concurrency']:>8} "
                f"{r['images_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
                f"{r['p99_ms']:>8.1f} {r['mean_batch'] or '-':>8} {r['errors']:>8}"
            )
    for name, reason in result.get("failed_servers", {}).items():
        lines.append(f"{name:<12} did not start: {reason[-200:]}")
    lines.append("ratios: " + json.dumps(result["ratios"]))
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    styles = ["-", "--", ":", "-."]
    sets = list(dict.fromkeys(r.get("image_set", "-") for v in result["http"].values() for r in v))
    for k, (name, rows) in enumerate(result["http"].items()):
        color = f"C{k}"
        for set_name in sets:
            part = [r for r in rows if r.get("image_set", "-") == set_name]
            if not part:
                continue
            ls = styles[sets.index(set_name) % len(styles)]
            c = [r["concurrency"] for r in part]
            label = f"{name} {set_name}"
            a.plot(c, [r["images_per_s"] for r in part], ls=ls, c=color, marker="o", label=label)
            b.plot(c, [r["p99_ms"] for r in part], ls=ls, c=color, marker="o", label=label)
    a.axhline(
        result["model_only"]["best_images_per_s"], ls="--", c="gray", label="model-only ceiling"
    )
    ov = result.get("openvino") or {}
    if ov.get("available"):
        a.axhline(ov["best_images_per_s"], ls=":", c="black", label=f"OpenVINO {ov['precision']}")
    for ax, title in ((a, "throughput (images/s)"), (b, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    b.set_yscale("log")
    hw = _hardware(result)
    fig.suptitle(f"{result['model']} on {result['device']}: {hw}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
