"""Servers side by side over HTTP, taking turns: every server is started once and kept up, and the
load visits them in rotation (the order reversed every other round), so that a shared machine's
drift, 10-20% within minutes on some, falls on all of them alike. `imgcls bench` measures one
server after the other; this is for a gap within that drift. The servers not measured are
stopped (SIGSTOP to their process group) and continued for their turn: an idle LitServe polls
its queues, 0.2 of a core on a 2-core AMD EPYC, and took that from the server beside it.

    python bench/ab_servers.py [--servers imgcls,imgcls-api,litserve] [--levels 16,32]
        [--rounds 2] [--set imagenet] [--seconds 15] [--max-batch 8] [--out ab.json]

Servers are `imgcls bench`'s (imgcls, imgcls-int8, naive, litserve) and ``imgcls-api``: imgcls
with ``IMGCLS_DECODE=api`` (uploads decoded in the API process). resnet50 by default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.benchmarks.common import free_port, image_set, start_server, stop_server
from app.benchmarks.harness import _servers, machine
from app.benchmarks.loadgen import run_load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--servers", default="imgcls,imgcls-api,litserve")
    p.add_argument("--levels", default="16,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", default="imagenet")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--out", default="ab-servers.json")
    args = p.parse_args()
    # a SIGTERM (timeout, a CI's stop) runs the cleanup below: the servers are in sessions of
    # their own, and stopped ones would stay behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    defs = _servers(args.model, "cpu", "auto", args.max_batch, 1)
    for name in ("imgcls", "imgcls-int8"):
        # a stopped imgcls is stopped whole, its worker's heartbeat too: the watchdog (60 s by
        # default) would count the worker hung on its next turn and restart it mid-measurement
        a, e, h, u = defs[name]
        defs[name] = (a, {**e, "IMGCLS_WORKER_TIMEOUT_S": "3600"}, h, u)
    args_, env, health, upload = defs["imgcls"]
    defs["imgcls-api"] = (args_, {**env, "IMGCLS_DECODE": "api"}, health, upload)
    names = args.servers.split(",")
    unknown = [n for n in names if n not in defs]
    if unknown:
        p.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(defs)}")
    uploads = image_set(args.set)
    rows: list[dict] = []
    result: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
        "settings": vars(args),
        "rows": rows,
    }
    procs = {}
    try:
        for name in names:
            a, e, h, u = defs[name]
            port = free_port()
            proc = start_server([*a, "--port", str(port)], e, f"http://127.0.0.1:{port}{h}")
            procs[name] = (proc, port, u)
            os.killpg(proc.pid, signal.SIGSTOP)  # each server runs only for its turn
            print(f"{name} up at {time.strftime('%H:%M:%S')}", flush=True)
        for rnd in range(args.rounds):
            for c in (int(x) for x in args.levels.split(",")):
                for name in names if rnd % 2 == 0 else names[::-1]:
                    proc, port, u = procs[name]
                    os.killpg(proc.pid, signal.SIGCONT)
                    try:
                        r = run_load(
                            f"http://127.0.0.1:{port}", uploads, c, args.seconds,
                            warmup_s=args.warmup, upload=u,
                        )  # fmt: skip
                    finally:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGSTOP)
                    row = {
                        "round": rnd, "server": name, "clients": c, "at": time.strftime("%H:%M:%S"),
                        "images_per_s": r.images_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                        "mean_batch": r.mean_batch, "errors": r.errors,
                    }  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for proc, _, _ in procs.values():
            with contextlib.suppress(ProcessLookupError):  # a group already gone
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped process would not see SIGTERM
            stop_server(proc)
        result["mean_images_per_s"] = means(rows)  # what was measured, also after an error
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["mean_images_per_s"]))


def means(rows: list[dict]) -> dict[str, float]:
    out = {}
    for name in dict.fromkeys(r["server"] for r in rows):
        for c in sorted({r["clients"] for r in rows if r["server"] == name}):
            got = [r["images_per_s"] for r in rows if r["server"] == name and r["clients"] == c]
            out[f"{name}@{c}"] = round(sum(got) / len(got), 2)
    return out


if __name__ == "__main__":
    main()
