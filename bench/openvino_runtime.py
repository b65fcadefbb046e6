"""imgcls on its two CPU runtimes (IMGCLS_CPU_RUNTIME=torch | openvino), and OpenVINO alone, in
one run on one machine.

For each precision (``bf16``: the worker's default where the CPU has AVX512-BF16 or AMX;
``int8``: ``MODEL:int8``, torchvision's quantized model, random weights):

1. model-only: the workers' own Runner with each runtime, each load in a child process of its
   own (the two runtimes' thread pools never share a process), alternating for --rounds rounds
   with the first to go rotating, --seconds at batch --batch each; then OpenVINO alone
   (app/benchmarks/openvino_peer.py: its THROUGHPUT hint and request queue, int8 by NNCF) at
   the same batch, as in the bench table;
2. over HTTP: one imgcls server per runtime (uvicorn, the service's defaults, batch limit
   --batch), --clients closed-loop clients with ImageNet-size and phone-size uploads, one server
   after the other (the order rotates by precision); each against its own model-only figure.

    .venv/bin/python bench/openvino_runtime.py --out docs/bench/openvino-runtime.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.benchmarks.common import free_port, image_set, start_server, stop_server
from app.benchmarks.harness import _model_only_name, _servers, machine
from app.benchmarks.loadgen import run_load

RUNTIMES = ("torch", "openvino")


def child(kind: str, model: str, precision: str, runtime: str, batch: int, seconds: float) -> None:
    """In a child process: one model-only measurement, printed as the last line (JSON)."""
    if kind == "peer":
        from app.benchmarks import openvino_peer

        out = openvino_peer.model_only(model, [batch], seconds, int8=precision == "int8")
    else:
        from app.benchmarks.harness import model_only

        name, prec = _model_only_name(model, precision)
        out = model_only(name, "cpu", prec, [batch], seconds, runtime=runtime)
    print(json.dumps(out), flush=True)


def measure(kind: str, model: str, precision: str, runtime: str, args: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, model, precision, runtime,
           str(args.batch), str(args.seconds)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def http(model: str, precision: str, runtime: str, uploads: dict[str, list[bytes]], args: Any):
    name = "imgcls-int8" if precision == "int8" else "imgcls"
    served = "auto" if precision == "int8" else precision  # int8: the model variant's own
    cmd, env, health, upload = _servers(model, "cpu", served, args.batch, 1)[name]
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(
        [*cmd, "--port", str(port)],
        {**env, "IMGCLS_CPU_RUNTIME": runtime},
        f"http://127.0.0.1:{port}{health}",
    )
    rows: dict[str, Any] = {"start_s": round(time.perf_counter() - t0, 1)}
    try:
        for set_name, images in uploads.items():
            r = run_load(f"http://127.0.0.1:{port}", images, args.clients, args.duration,
                         warmup_s=args.warmup, upload=upload)  # fmt: skip
            rows[set_name] = asdict(r)
            print(f"   http {precision} {runtime} {set_name}: {r.images_per_s} img/s, "
                  f"p50 {r.p50_ms} p99 {r.p99_ms} ms, batch {r.mean_batch}, errors {r.errors}",
                  flush=True)  # fmt: skip
    finally:
        stop_server(proc)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--precisions", default="bf16,int8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=4.0, help="model-only time per measurement")
    p.add_argument("--rounds", type=int, default=2, help="model-only rounds per runtime")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0, help="HTTP seconds measured")
    p.add_argument("--warmup", type=float, default=2.0, help="HTTP seconds before measuring")
    p.add_argument("--image-sets", default="imagenet,phone")
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench-results/openvino-runtime.json"))
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, model, precision, runtime, batch, seconds = args.child
        child(kind, model, precision, runtime, int(batch), float(seconds))
        return
    uploads = {s: image_set(s) for s in args.image_sets.split(",")} if not args.no_http else {}
    result: dict[str, Any] = {
        "model": args.model, "machine": machine(), "batch": args.batch,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "by_precision": {},
    }  # fmt: skip
    for i, precision in enumerate(args.precisions.split(",")):
        entry: dict[str, Any] = {"model_only": {r: [] for r in RUNTIMES}}
        for round_ in range(args.rounds):
            order = RUNTIMES if (round_ + i) % 2 == 0 else RUNTIMES[::-1]
            for runtime in order:
                out = measure("runner", args.model, precision, runtime, args)
                entry["model_only"][runtime].append(out)
                print(f"== {precision} model-only {runtime}: "
                      f"{out.get('best_images_per_s', out.get('error'))} images/s "
                      f"({out.get('backend')}, {out.get('precision')})", flush=True)  # fmt: skip
        entry["openvino_alone"] = measure("peer", args.model, precision, "-", args)
        alone = entry["openvino_alone"].get("best_images_per_s")
        print(f"== {precision} OpenVINO alone: {alone} images/s", flush=True)
        summary: dict[str, Any] = {}
        for runtime in RUNTIMES:
            figures = [
                m["best_images_per_s"] for m in entry["model_only"][runtime] if "error" not in m
            ]
            summary[runtime] = statistics.mean(figures) if figures else None
        summary["openvino_alone"] = entry["openvino_alone"].get("best_images_per_s")
        entry["model_only_mean"] = summary
        if uploads:
            order = RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]
            entry["http"] = {r: http(args.model, precision, r, uploads, args) for r in order}
            entry["service_vs_own_model_only"] = {
                r: {s: round(entry["http"][r][s]["images_per_s"] / summary[r], 3)
                    for s in uploads if summary[r]}
                for r in RUNTIMES
            }  # fmt: skip
        result["by_precision"][precision] = entry
        print(json.dumps({precision: {k: v for k, v in entry.items() if k != "model_only"}},
                         indent=1), flush=True)  # fmt: skip
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
