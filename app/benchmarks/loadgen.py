"""Closed-loop load: C concurrent clients, each uploading a JPEG and waiting for the answer before
sending the next, for a bounded time, to 127.0.0.1 only. A request counts when it ends inside
the measured window (throughput and latency percentiles). Spread over processes when one Python
process cannot generate enough requests (fast GPUs)."""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing as mp
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlparse

import numpy as np

from app import memory


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


class _Connection:
    """A minimal keep-alive HTTP/1.1 client connection for prebuilt requests.

    The load generator shares the machine with the server it measures, so it is kept lean:
    requests are built once, and a response is read by its Content-Length (or chunks). About a
    tenth of httpx's CPU per request, which leaves that CPU to the servers being measured.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                parts = []
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    parts.append(await self.reader.readexactly(size + 2))
                    if size == 0:
                        break
                body = b"".join(p[:-2] for p in parts)
            else:
                body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
            if headers.get(b"connection", b"").lower() == b"close":
                self.close()
            return status, body
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def build_requests(
    host: str, port: int, path: str, params: dict[str, str], images: list[bytes], upload: str
) -> list[bytes]:
    """One complete HTTP request per image: a multipart upload, or base64 JSON ("json")."""
    target = path + ("?" + urlencode(params) if params else "")
    out = []
    for data in images:
        if upload == "json":
            body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
            ctype = "application/json"
        else:
            boundary = uuid.uuid4().hex
            body = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="img.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
                ).encode()
                + data
                + f"\r\n--{boundary}--\r\n".encode()
            )
            ctype = f"multipart/form-data; boundary={boundary}"
        head = (
            f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


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
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    requests = build_requests(host, port, path, params, images, upload)
    latencies: list[float] = []
    batches: list[int] = []
    errors = 0
    start = time.monotonic()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def user(k: int) -> None:
        nonlocal errors
        conn = _Connection(host, port)
        i = k
        try:
            while True:
                t0 = time.monotonic()
                if t0 >= stop_at:
                    return
                n = i % len(requests)
                i += concurrency
                try:
                    status, raw = await asyncio.wait_for(conn.request(requests[n]), 120)
                    ok = status == 200
                    body = json.loads(raw) if ok else None
                except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
                    ok, body = False, None
                t1 = time.monotonic()
                # Counted by when it ends: requests that end inside the window measure the
                # throughput without bias. Counting only those that also start inside it drops
                # about one latency per client (latency / duration of the throughput: 11% at 32
                # clients and 0.85 s over 8 s), which read as a drop at high client counts.
                if measure_from <= t1 <= stop_at:
                    if ok:
                        latencies.append((t1 - t0) * 1000.0)
                        if isinstance(body, dict) and "batch_size" in body:
                            batches.append(int(body["batch_size"]))
                    else:
                        errors += 1
        finally:
            conn.close()

    await asyncio.gather(*(user(k) for k in range(concurrency)))
    return latencies, batches, errors


def _proc(args: tuple[Any, ...]) -> tuple[list[float], list[int], int]:
    # The generator's own full collections (up to ~0.2 s in a process that has imported torch)
    # would stop all its clients at once and read as the server's tail: frozen for the run.
    memory.settle()
    try:
        return asyncio.run(_clients(*args))
    finally:
        memory.unsettle()


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
