"""Start-up of `imgcls serve` with its default model set: seconds until /readyz answers 200, the
memory of the whole process tree once ready (PSS: shared pages counted once), and what /models
says each model settled on (precision, backend, batch size). One line of figures per setting.

    python bench/startup.py [--env IMGCLS_COMPILE=0 ...] [--out startup.json]

Random weights (ImageNet checkpoints cannot be downloaded here; start-up does not depend on their
values). Each ``--env`` list is one more start, after the default one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.benchmarks.common import free_port, start_server, stop_server
from app.benchmarks.harness import machine

DEFAULT_SET = "alexnet,vgg16,resnet18,resnet50"  # IMGCLS_MODELS's default (README)


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            pids.append(int(entry.name))
    return pids


def _pss_mib(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return round(total_kb / 1024, 1)  # smaps_rollup counts kB of 1024 bytes: MiB


def start_once(extra: dict[str, str]) -> dict[str, Any]:
    env = {
        "IMGCLS_ALLOW_RANDOM_WEIGHTS": "1",
        "IMGCLS_AUTO_DOWNLOAD": "0",
        "IMGCLS_LOG_LEVEL": "warning",
        "IMGCLS_GRPC_PORT": "0",
        "IMGCLS_MODELS": DEFAULT_SET,  # not whatever the caller's environment says
        **extra,
    }
    port = free_port()
    t0 = time.monotonic()
    proc = start_server(
        ["-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env,
        f"http://127.0.0.1:{port}/readyz",
    )
    try:
        ready_s = round(time.monotonic() - t0, 1)
        time.sleep(2)  # the first collections after start-up
        pids = _session_pids(proc.pid)
        models = httpx.get(f"http://127.0.0.1:{port}/models", timeout=10).json()["models"]
        return {
            "env": extra,
            "ready_s": ready_s,
            "processes": len(pids),
            "pss_mib": _pss_mib(pids),
            "models": [
                {
                    k: m.get(k)
                    for k in ("name", "status", "precision", "backend", "batch_size", "device")
                }
                for m in models
                if m.get("status") != "not-loaded"
            ],
        }
    finally:
        stop_server(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", action="append", default=[], help="K=V[,K=V...]: one more start")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    # a SIGTERM runs start_once's cleanup: the server is in a session of its own
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    runs = [{}] + [dict(kv.split("=", 1) for kv in spec.split(",")) for spec in args.env]
    result: dict[str, Any] = {
        "machine": machine(),
        "cpus": os.cpu_count(),
        "inherited_imgcls_env": {k: v for k, v in os.environ.items() if k.startswith("IMGCLS_")},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "runs": [],
    }
    try:
        for extra in runs:
            r = start_once(extra)
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
    finally:  # the starts measured, also when a later one fails
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
