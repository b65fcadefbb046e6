"""Cohorts of closed-loop clients against one imgcls server, with and without the batcher's
merging (``IMGCLS_BATCH_MERGE_SHARE``, app/engine/batcher.py ``ModelBatcher._merge``).

Two groups of clients, the second starting a moment after the first (during the first batch's
forward pass), each client sending its next upload when answered: without merging the service
keeps running one group's batch after the other's (half the batch limit each); with it, the
groups become one. Per window: images/s (both groups), p50/p99 per group, mean batch size and
forward time per batch from /metrics. The settings alternate in the order given, one server
each; one run on one machine.

    python bench/cohorts.py [--model resnet50:int8] [--max-batch 16] [--clients 8]
        [--shares 0,0.1,0.1,0] [--windows 3] [--seconds 12] [--out cohorts.json]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from drop32 import batch_figures, metrics

from app.benchmarks.common import free_port, image_set, start_server, stop_server
from app.benchmarks.harness import _servers, machine
from app.benchmarks.loadgen import LoadResult, run_load


def window(url: str, model: str, images: list[bytes], clients: int, seconds: float, lag: float):
    before = metrics(url, model)
    results: list[LoadResult | None] = [None, None]

    def group(i: int) -> None:
        results[i] = run_load(url, images, clients, seconds, warmup_s=2.0)

    threads = [threading.Thread(target=group, args=(i,)) for i in range(2)]
    threads[0].start()
    time.sleep(lag)  # the second group arrives while the first one's batch runs
    threads[1].start()
    for t in threads:
        t.join()
    after = metrics(url, model)
    figures = batch_figures(before, after)
    a, b = results
    assert a is not None and b is not None
    return {
        "images_per_s": round(a.images_per_s + b.images_per_s, 2),
        "p50_ms": [a.p50_ms, b.p50_ms],
        "p99_ms": [a.p99_ms, b.p99_ms],
        "errors": a.errors + b.errors,
        "mean_batch": figures["mean_batch"],
        "forward_ms_per_batch": figures["forward_ms_per_batch"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50:int8")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--clients", type=int, default=8, help="clients per group (two groups)")
    p.add_argument("--shares", default="0,0.1,0.1,0", help="IMGCLS_BATCH_MERGE_SHARE, in turn")
    p.add_argument("--windows", type=int, default=3, help="measured windows per server")
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--lag", type=float, default=0.25, help="seconds between the two groups")
    p.add_argument("--set", default="imagenet")
    p.add_argument("--out", default="cohorts.json")
    args = p.parse_args()
    images = image_set(args.set)
    out: dict[str, Any] = {
        "machine": machine(),
        "settings": vars(args),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": os.getloadavg(),
        "runs": [],
    }
    for share in args.shares.split(","):
        cmd, env, health, _ = _servers(args.model, "cpu", "auto", args.max_batch, 1)["imgcls"]
        env = {**env, "IMGCLS_BATCH_MERGE_SHARE": share}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server([*cmd, "--port", str(port)], env, url + health)
        try:
            for _ in range(args.windows):
                row = {"merge_share": float(share)} | window(
                    url, args.model, images, args.clients, args.seconds, args.lag
                )
                print(json.dumps(row), flush=True)
                out["runs"].append(row)
        finally:
            stop_server(proc)
    for share in dict.fromkeys(args.shares.split(",")):
        rows = [r for r in out["runs"] if r["merge_share"] == float(share)]
        rate = sum(r["images_per_s"] for r in rows) / len(rows)
        batch = sum(r["mean_batch"] or 0 for r in rows) / len(rows)
        print(f"IMGCLS_BATCH_MERGE_SHARE={share}: {rate:.1f} images/s, mean batch {batch:.1f} "
              f"({len(rows)} windows)")  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
