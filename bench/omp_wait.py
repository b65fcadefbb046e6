"""Does OpenMP's spin-wait in the CPU workers cost the service throughput?

After each parallel region, libgomp's threads spin (GOMP_SPINCOUNT, 300,000 turns by default)
before they sleep. Between batches, and while a worker decodes, those spinning threads take CPU
from the decode threads and the API process on the same cores. This starts one imgcls server per
OpenMP setting (default; OMP_WAIT_POLICY=PASSIVE; GOMP_SPINCOUNT=10000), all up at once, and:

- ``--mode http``: sends the same closed-loop load to each in turn, rotating the order each round
  (images/s, p50, p99 per round);
- ``--mode soak``: sends the soak test's request mix (tests/test_soak.py: small CIFAR models,
  /classify, /compare, bad uploads, /models) to each in turn and reads each process's CPU time
  from /proc: CPU per request in the API process and in the worker.

    .venv/bin/python bench/omp_wait.py --mode http --model resnet50:int8 --out docs/bench/x.json
    .venv/bin/python bench/omp_wait.py --mode soak --out docs/bench/y.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.benchmarks.common import free_port, image_set, start_server, stop_server
from app.benchmarks.loadgen import run_load
from app.engine import fastpath

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
}
SHARED = Path(
    os.environ.get("IMGCLS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == pid:
                out.append(int(entry.name))
    return out


def start(model: str, weights: Path, max_batch: str, extra: dict[str, str]) -> tuple[Any, str]:
    port = free_port()
    env = {
        "IMGCLS_MODELS": model, "PORT": str(port), "IMGCLS_ALLOW_RANDOM_WEIGHTS": "1",
        "IMGCLS_AUTO_DOWNLOAD": "0", "IMGCLS_LOG_LEVEL": "warning", "IMGCLS_GRPC_PORT": "0",
        "IMGCLS_MAX_BATCH_SIZE": max_batch, "IMGCLS_WEIGHTS_DIR": str(weights), **extra,
    }  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    return start_server(["-m", "app.cli", "serve"], env, f"{url}/readyz"), url


def http_mode(args: argparse.Namespace, weights: Path) -> dict[str, Any]:
    images = image_set(args.set)
    servers = {n: start(args.model, weights, str(args.max_batch), e) for n, e in VARIANTS.items()}
    try:
        params = {"model": args.model}
        for _, url in servers.values():
            run_load(url, images, args.clients, 2, 1, params=params)  # warm
        rounds: dict[str, list[dict[str, float]]] = {n: [] for n in VARIANTS}
        names = list(VARIANTS)
        for r in range(args.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                x = run_load(servers[n][1], images, args.clients, args.seconds, 1, params=params)
                rounds[n].append({"images_per_s": x.images_per_s, "p50_ms": x.p50_ms,
                                  "p99_ms": x.p99_ms})  # fmt: skip
            print(r, {n: rounds[n][-1] for n in names}, flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    return {
        n: {"rounds": v, "mean_images_per_s": round(sum(x["images_per_s"] for x in v) / len(v), 1)}
        for n, v in rounds.items()
    }


def soak_mode(args: argparse.Namespace, weights: Path) -> dict[str, Any]:
    from tests.test_soak import _drive  # the soak's own request mix

    servers = {
        n: start("cifar10_resnet20,cifar10_plain20", weights, "auto", e)
        for n, e in VARIANTS.items()
    }
    out: dict[str, Any] = {}
    try:
        for n, (proc, url) in servers.items():
            asyncio.run(_drive(url, 300, 1))  # warm
            pids = {"api": proc.pid}
            for child in children(proc.pid):
                cmd = Path(f"/proc/{child}/cmdline").read_text()
                if "multiprocessing.spawn" in cmd:  # a spawned worker
                    pids["worker"] = child
                elif "multiprocessing.forkserver" in cmd and children(child):
                    pids["worker"] = children(child)[0]  # forked from the fork server
            before = {k: cpu_s(p) for k, p in pids.items()}
            t0 = time.perf_counter()
            asyncio.run(_drive(url, args.requests, 2))
            wall = time.perf_counter() - t0
            per_request = {
                f"{k}_cpu_ms_per_request": round((cpu_s(pid) - before[k]) / args.requests * 1e3, 2)
                for k, pid in pids.items()
            }
            out[n] = {"requests_per_s": round(args.requests / wall, 1), **per_request}
            print(n, out[n], flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("http", "soak"), default="http")
    p.add_argument("--model", default="resnet50:int8")
    p.add_argument("--set", default="imagenet")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    weights = Path("/tmp/imgcls-omp-wait-weights")
    weights.mkdir(exist_ok=True)
    cifar = SHARED / "cifar10-resnets" / "resnet20-12fca82f.th"
    if cifar.exists() and not (weights / cifar.name).exists():
        (weights / cifar.name).symlink_to(cifar)
    result: dict[str, Any] = {
        "mode": args.mode, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "cpu_features": fastpath.cpu_features().names(), "variants": VARIANTS,
    }  # fmt: skip
    if args.mode == "http":
        result.update(model=args.model, image_set=args.set, clients=args.clients,
                      max_batch=args.max_batch, seconds=args.seconds)  # fmt: skip
        result["results"] = http_mode(args, weights)
    else:
        result.update(requests=args.requests)
        result["results"] = soak_mode(args, weights)
    print(json.dumps(result["results"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
