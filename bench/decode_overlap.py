"""Would decoding the next batch during the forward pass raise a CPU worker's throughput?

A worker decodes a batch of uploads (IMGCLS_DECODE=worker), then runs its forward pass. This
times, in one process and the same minutes, on each CPU runtime (IMGCLS_CPU_RUNTIME): the
decode of one batch of ImageNet-size JPEG uploads (the workers' own Decoder, per image, on one
thread and on the worker's threads), then batches run one after the other (decode, then
forward) against the same with each decode on a thread of its own during the forward pass (one
decode per pass, as a pipelined worker would), in alternating blocks.

    .venv/bin/python bench/decode_overlap.py --model resnet50:int8 --out docs/bench/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import imaging
from app.benchmarks.common import image_set
from app.catalog import build_catalog
from app.engine import fastpath
from app.engine.decoding import Decoder, Encoded
from app.engine.worker import Runner, WorkerConfig

MAX_PIXELS = 40_000_000


def per_batch_ms(step: Any, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return round((time.perf_counter() - t) / n * 1000, 1)


def run(model: str, runtime: str, batch: int, passes: int, rounds: int) -> dict[str, Any]:
    spec = build_catalog().get(model)
    fast = fastpath.resolve("auto", None, None, "cpu")
    threads = os.cpu_count() or 1
    cfg = WorkerConfig(0, "cpu", fast.precision, fast.channels_last, fast.compile, threads,
                       batch, [], runtime=runtime)  # fmt: skip
    runner = Runner(cfg)
    backend = runner.load(spec.load_plan(None))
    pre = spec.transform
    uploads = []
    for data in image_set("imagenet"):
        p = imaging.probe(data, MAX_PIXELS)
        uploads.append(Encoded(data, p.plain_jpeg, (p.width, p.height), p.progressive))
    items = (uploads * batch)[:batch]
    decoder = Decoder(threads, MAX_PIXELS, "cpu", False, True)
    one_thread = Decoder(1, MAX_PIXELS, "cpu", False, True)
    x = decoder.prepare(items, pre).batch
    assert x is not None

    def decode() -> None:
        decoder.prepare(items, pre)

    def serial() -> None:
        decode()
        runner.forward(spec.name, x)

    def overlapped() -> None:
        t = threading.Thread(target=decode)
        t.start()
        runner.forward(spec.name, x)
        t.join()

    serial()
    overlapped()  # warm
    out: dict[str, Any] = {
        "backend": backend,
        "precision": runner.precisions[spec.name],
        "decode_ms_per_image_one_thread": round(
            per_batch_ms(lambda: one_thread.prepare(items, pre), passes) / batch, 2
        ),
        "decode_ms_per_batch": per_batch_ms(decode, passes),
        "forward_ms_per_batch": per_batch_ms(lambda: runner.forward(spec.name, x), passes),
        "serial_ms_per_batch": [],
        "overlapped_ms_per_batch": [],
    }
    for r in range(rounds):  # alternating, the first to go rotating
        order = [("serial", serial), ("overlapped", overlapped)]
        for name, step in order if r % 2 == 0 else order[::-1]:
            out[f"{name}_ms_per_batch"].append(per_batch_ms(step, passes))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50:int8")
    p.add_argument("--runtimes", default="openvino,torch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--passes", type=int, default=15)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result: dict[str, Any] = {
        "model": args.model, "batch": args.batch, "passes": args.passes,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "cpu_features": fastpath.cpu_features().names(), "runtimes": {},
    }  # fmt: skip
    for runtime in args.runtimes.split(","):
        result["runtimes"][runtime] = run(args.model, runtime, args.batch, args.passes, args.rounds)
        print(runtime, json.dumps(result["runtimes"][runtime]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
