"""Every CPU path of one model, model-only, taking turns in one process: which is fastest here.

fastpath.resolve picks a CPU's default path from its flags (bf16, channels-last and inductor
with AVX512-BF16 or AMX; fp32, channels-last and inductor without). This script loads the same
model once per path through the workers' own Runner (random weights) and calls them in turn, a
few batches each (--block), so that the drift of a shared machine's speed cancels, and prints
time per batch and images/s for each:

- fp32 eager (contiguous), what an explicit IMGCLS_PRECISION=fp32 runs;
- fp32 channels-last eager;
- fp32 channels-last, inductor (frozen graph per batch size): the default without bf16;
- bf16 channels-last, inductor (the default with AVX512-BF16 or AMX; emulated without);
- int8 eager (``MODEL:int8``: torchvision's quantized model) and int8 compiled (the PT2E graph,
  inductor), where the model has published int8 weights.

    .venv/bin/python bench/cpu_paths.py --model resnet50 --batch 8 --passes 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from app.catalog import build_catalog
from app.engine import fastpath
from app.engine.worker import Runner, WorkerConfig

# name -> (model suffix, precision, channels_last, compile)
PATHS: dict[str, tuple[str, str, bool, bool]] = {
    "fp32 eager": ("", "fp32", False, False),
    "fp32 channels-last eager": ("", "fp32", True, False),
    "fp32 channels-last inductor": ("", "fp32", True, True),
    "bf16 channels-last inductor": ("", "bf16", True, True),
    "int8 eager": (":int8", "fp32", False, False),
    "int8 inductor": (":int8", "fp32", True, True),
}


def load(model: str, path: str, batch: int) -> tuple[Runner, str, str, float]:
    suffix, precision, channels_last, compile = PATHS[path]
    name = model + suffix
    spec = build_catalog().get(name)
    cfg = WorkerConfig(0, "cpu", precision, channels_last, compile, os.cpu_count(), batch, [])
    runner = Runner(cfg)
    t0 = time.perf_counter()
    backend = runner.load(spec.load_plan(None))
    return runner, name, backend, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--block", type=int, default=2, help="forward passes per turn")
    ap.add_argument(
        "--paths", default=",".join(PATHS), help="comma-separated, of: " + ", ".join(PATHS)
    )
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or args.block < 1 or args.passes < args.block:
        raise SystemExit(f"unknown paths {unknown}; --block must be in 1..--passes")
    os.environ.setdefault("IMGCLS_ALLOW_RANDOM_WEIGHTS", "1")
    catalog = build_catalog()
    try:
        catalog.get(f"{args.model}:int8")
    except KeyError:  # no published int8 weights (calibrated int8 needs images: not here)
        paths = [p for p in paths if not PATHS[p][0]]
    loaded: dict[str, tuple[Runner, str, str, float]] = {}
    for path in paths:
        loaded[path] = load(args.model, path, args.batch)
        print(f"loaded {path}: {loaded[path][2]}, {loaded[path][3]:.1f} s", flush=True)
    size = catalog.get(args.model).input_size
    x = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    for runner, name, _, _ in loaded.values():
        for _ in range(2):
            runner.forward(name, x)
    times: dict[str, list[float]] = {path: [] for path in loaded}
    order = list(loaded)
    for _ in range(args.passes // args.block):  # blocks in turn: the machine's drift cancels
        for path in order:
            runner, name, _, _ = loaded[path]
            for _ in range(args.block):
                t0 = time.perf_counter()
                runner.forward(name, x)
                times[path].append((time.perf_counter() - t0) * 1000)
        order = order[1:] + order[:1]  # each goes first in its turn
    result: dict[str, Any] = {
        "model": args.model, "batch": args.batch, "block": args.block,
        "cpu_flags": fastpath.cpu_features().names(),
        "default": fastpath.resolve("auto", None, None, "cpu").__dict__,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "paths": {},
    }  # fmt: skip
    for path, ts in times.items():
        ts = sorted(ts)
        mean = sum(ts) / len(ts)
        result["paths"][path] = {
            "backend": loaded[path][2],
            "load_and_compile_s": round(loaded[path][3], 1),
            "mean_ms": round(mean, 1),
            "median_ms": round(ts[len(ts) // 2], 1),
            "images_per_s": round(args.batch * 1000 / mean, 1),
        }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
