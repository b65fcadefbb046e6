"""Closed-loop load: C concurrent clients, each uploading a JPEG and waiting for the answer before
sending the next, for a bounded time, to 127.0.0.1 only. Spread over processes when one Python
process cannot generate enough requests (fast GPUs)."""

from __future__ import annotations

import asyncio
import base64
import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float | None


async def _clients(
    url: str,
    path: str,
    params: dict[str, str],
    images: list[bytes],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    upload: str,
) -> tuple[list[float], list[int], int]:
    # "json": base64 in JSON, for servers that cannot take multipart uploads
    encoded = [base64.b64encode(i).decode() for i in images] if upload == "json" else []
    latencies: list[float] = []
    batches: list[int] = []
    errors = 0
    start = time.monotonic()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def user(k: int) -> None:
            nonlocal errors
            i = k
            while True:
                t0 = time.monotonic()
                if t0 >= stop_at:
                    return
                n = i % len(images)
                i += concurrency
                try:
                    if upload == "json":
                        r = await client.post(path, params=params, json={"image": encoded[n]})
                    else:
                        files = {"file": ("img.jpg", images[n], "image/jpeg")}
                        r = await client.post(path, params=params, files=files)
                    ok = r.status_code == 200
                    body = r.json() if ok else None
                except httpx.HTTPError:
                    ok, body = False, None
                t1 = time.monotonic()
                if t0 >= measure_from and t1 <= stop_at:
                    if ok:
                        latencies.append((t1 - t0) * 1000.0)
                        if body and "batch_size" in body:
                            batches.append(int(body["batch_size"]))
                    else:
                        errors += 1

        await asyncio.gather(*(user(k) for k in range(concurrency)))
    return latencies, batches, errors


def _proc(args: tuple[Any, ...]) -> tuple[list[float], list[int], int]:
    return asyncio.run(_clients(*args))


def run_load(
    url: str,
    images: list[bytes],
    concurrency: int,
    duration_s: float,
    warmup_s: float = 3.0,
    path: str = "/classify",
    params: dict[str, str] | None = None,
    processes: int = 1,
    upload: str = "multipart",
) -> LoadResult:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("load is only ever sent to this machine (127.0.0.1)")
    params = params or {}
    processes = max(1, min(processes, concurrency))
    shares = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    jobs = [(url, path, params, images, c, warmup_s, duration_s, upload) for c in shares]
    if processes == 1:
        parts = [_proc(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(processes) as pool:
            parts = pool.map(_proc, jobs)
    lat = np.array([x for p in parts for x in p[0]])
    batches = [x for p in parts for x in p[1]]
    errors = sum(p[2] for p in parts)
    n = len(lat)
    return LoadResult(
        concurrency=concurrency,
        duration_s=duration_s,
        requests=n,
        errors=errors,
        images_per_s=round(n / duration_s, 2),
        p50_ms=round(float(np.percentile(lat, 50)), 2) if n else float("nan"),
        p95_ms=round(float(np.percentile(lat, 95)), 2) if n else float("nan"),
        p99_ms=round(float(np.percentile(lat, 99)), 2) if n else float("nan"),
        mean_batch=round(float(np.mean(batches)), 2) if batches else None,
    )
