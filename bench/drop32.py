"""Why imgcls gives fewer images/s at 32 clients than at 16 (issue 12, point 6): one imgcls
server, the load alternating 16, 32, 16, 32 clients, and for each level what the server did per
image and per batch, read from outside: its /metrics (batch sizes, forward time per batch, queue
wait), each process's CPU time and context switches (/proc), and the load generator's own CPU.

    python bench/drop32.py [--model resnet50] [--seconds 8] [--max-batch 8] [--set imagenet]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.benchmarks.common import free_port, image_set, start_server, stop_server
from app.benchmarks.harness import _servers
from app.benchmarks.loadgen import run_load

TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> dict[int, str]:
    """pid -> short command line, for ``pid`` and every process below it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found.update(kids)
        todo.extend(kids)
    out = {}
    for p in sorted(found):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # a worker is spawned (spawn_main) or forked from the fork server, whose command
        # line it keeps (the server itself is the API process's child)
        forked = "multiprocessing.forkserver" in cmd and parents.get(p) != pid
        out[p] = "api" if p == pid else ("worker" if "spawn_main" in cmd or forked else "other")
    return out


def proc_sample(pid: int) -> dict[str, float]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = Path(f"/proc/{pid}/status").read_text()
    ctx = dict(re.findall(r"(\w+_ctxt_switches):\s+(\d+)", status))
    return {
        "cpu_s": (int(stat[11]) + int(stat[12])) / TICK,
        "voluntary": int(ctx.get("voluntary_ctxt_switches", 0)),
        "involuntary": int(ctx.get("nonvoluntary_ctxt_switches", 0)),
        "threads": int(stat[17]),
    }


def metrics(url: str, model: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or f'model="{model}"' not in line:
            continue
        name, value = line.rsplit(" ", 1)
        m = re.match(r"(imgcls_(?:batch_size|inference_latency_seconds|queue_latency_seconds)"
                     r"_(?:sum|count|bucket))\{.*?(?:le=\"([^\"]+)\")?.*\}", name)  # fmt: skip
        if m:
            key = m.group(1) + (f"[{m.group(2)}]" if m.group(2) else "")
            out[key] = float(value)
    return out


def batch_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What ran between two ``metrics`` readings: the counters' differences, and the mean batch
    size and forward time per batch (None where no batch ran)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = d.get("imgcls_batch_size_count", 0.0)
    return {
        "delta": d,
        "mean_batch": round(d["imgcls_batch_size_sum"] / batches, 2) if batches else None,
        "forward_ms_per_batch": round(1000 * d["imgcls_inference_latency_seconds_sum"] / batches, 1)
        if batches
        else None,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--set", default="imagenet")
    p.add_argument("--levels", default="16,32,16,32")
    p.add_argument("--out", default="drop32.json")
    args = p.parse_args()
    images = image_set(args.set)
    cmd, env, health, _ = _servers(args.model, "cpu", "auto", args.max_batch, 1)["imgcls"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server([*cmd, "--port", str(port)], env, url + health)
    rows = []
    try:
        procs = descendants(proc.pid)
        print("processes:", procs, flush=True)
        for c in (int(x) for x in args.levels.split(",")):
            m0 = metrics(url, args.model)
            p0 = {pid: proc_sample(pid) for pid in procs}
            self0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.monotonic()
            r = run_load(url, images, c, args.seconds, warmup_s=2.0)
            wall = time.monotonic() - t0
            self1 = resource.getrusage(resource.RUSAGE_SELF)
            p1 = {pid: proc_sample(pid) for pid in procs}
            m1 = metrics(url, args.model)
            figures = batch_figures(m0, m1)
            d = figures["delta"]
            images_run = d["imgcls_batch_size_sum"]
            batches = d["imgcls_batch_size_count"]
            hist = {k: v for k, v in d.items() if k.startswith("imgcls_batch_size_bucket")}
            full = hist.get(f"imgcls_batch_size_bucket[{args.max_batch:.1f}]", 0.0) - hist.get(
                f"imgcls_batch_size_bucket[{args.max_batch // 2:.1f}]", 0.0
            )
            row = {
                "clients": c,
                "images_per_s": r.images_per_s,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "wall_s": round(wall, 2),
                "images_run": images_run,
                "mean_batch": figures["mean_batch"],
                "batches_above_half_max": round(full / batches, 3) if batches else None,
                "forward_ms_per_batch": figures["forward_ms_per_batch"],
                "queue_ms_per_image": round(
                    1000
                    * d["imgcls_queue_latency_seconds_sum"]
                    / max(1.0, d["imgcls_queue_latency_seconds_count"]),
                    1,
                ),
                "loadgen_cpu_ms_per_image": round(
                    1000
                    * (self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime)
                    / images_run,
                    2,
                ),
                "processes": {
                    f"{procs[pid]}:{pid}": {
                        "cpu_ms_per_image": round(
                            1000 * (p1[pid]["cpu_s"] - p0[pid]["cpu_s"]) / images_run, 2
                        ),
                        "cpu_share_of_wall": round((p1[pid]["cpu_s"] - p0[pid]["cpu_s"]) / wall, 2),
                        "involuntary_switches_per_image": round(
                            (p1[pid]["involuntary"] - p0[pid]["involuntary"]) / images_run, 2
                        ),
                        "voluntary_switches_per_image": round(
                            (p1[pid]["voluntary"] - p0[pid]["voluntary"]) / images_run, 2
                        ),
                    }
                    for pid in procs
                },
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        stop_server(proc)
    Path(args.out).write_text(json.dumps({"load_average": os.getloadavg(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
