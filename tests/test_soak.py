"""A bounded soak: tens of thousands of mixed requests against small models. Resident memory
stays flat after warm-up (< 5% growth), and no file descriptors or threads leak."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import images
from tests.conftest import (
    CIFAR_SAMPLE,
    CIFAR_WEIGHTS,
    IMAGES,
    ROOT,
    descendants,
    free_port,
    needs_shared,
    wait_until_ready,
)
from tests.rawhttp import multipart

pytestmark = needs_shared(CIFAR_WEIGHTS, CIFAR_SAMPLE, IMAGES)

TOTAL = int(os.environ.get("IMGCLS_SOAK_REQUESTS", "20000"))
WARMUP = TOTAL // 10


def _proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed while listing
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    # Batches handed to a worker in shared memory hold a /dev/shm descriptor until both sides
    # let go: a few are alive at any moment (bounded by the batches in flight), not a leak.
    shm = sum(t.startswith("/dev/shm/torch_") for t in targets)
    return {
        "rss_kb": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(targets) - shm,
        "shm_fds": shm,
    }


def _connections_closed(pid: int, timeout: float = 30) -> None:
    """Wait until every TCP socket the process holds is a listening one: the server has closed
    the connections its clients closed (counted while still open, they would look like a leak)."""
    deadline = time.monotonic() + timeout
    while True:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed while listing
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        states = []  # /proc/net/tcp: "st" is the 4th field, "inode" the 10th; 0A is LISTEN
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[9] in inodes:
                        states.append(fields[3])
        if all(st == "0A" for st in states):
            return
        assert time.monotonic() < deadline, f"connections still open after {timeout} s: {states}"
        time.sleep(0.05)


def _cuda_memory(url: str) -> dict[str, float]:
    """CUDA bytes allocated per device, from /metrics (empty on a CPU-only machine)."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('imgcls_device_memory_bytes{device="cuda'):
            out[line.split('"')[1]] = float(line.split()[-1])
    return out


def _request(method: str, target: str, port: int, body: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body:
        head += (
            "Content-Type: multipart/form-data; boundary=imgclsboundary\r\n"
            f"Content-Length: {len(body)}\r\n"
        )
    return head.encode() + b"\r\n" + body


async def _exchange(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
) -> tuple[int, bool]:
    """One request on a keep-alive connection: (status, whether the server keeps it open)."""
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    assert "transfer-encoding" not in headers, headers  # every answer has a Content-Length
    await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers.get("connection", "").lower() != "close"


async def _drive(url: str, n: int, seed: int) -> dict[int, int]:
    """``n`` mixed requests from 16 keep-alive connections. Raw HTTP/1.1 with the bodies built
    beforehand: an HTTP library's client costs more CPU per request than the server's API
    process (httpx: ~2.4 ms), and on two cores the soak's length was mostly the client's."""
    rng = random.Random(seed)
    port = int(url.rsplit(":", 1)[1])
    photos = [p.read_bytes() for p in sorted(CIFAR_SAMPLE.glob("*/000[0-4].jpg"))]
    photos += [(IMAGES / "chelsea.png").read_bytes(), (IMAGES / "horse.png").read_bytes()]
    photos = [multipart(p) for p in photos]
    bad = [multipart(b) for b in (b"", b"not an image", images.png_bomb())]
    models = _request("GET", "/models", port)

    def pick() -> bytes:
        roll = rng.random()
        if roll < 0.70:
            model = rng.choice(["cifar10_resnet20", "cifar10_plain20"])
            return _request("POST", f"/classify?model={model}", port, rng.choice(photos))
        if roll < 0.85:
            return _request("POST", "/compare?models=cifar10_resnet20,cifar10_plain20", port,
                            rng.choice(photos))  # fmt: skip
        if roll < 0.95:
            model = rng.choice(["cifar10_resnet20", "../x"])
            return _request("POST", f"/classify?model={model}", port, rng.choice(bad))
        return models

    requests = [pick() for _ in range(n)]
    codes: dict[int, int] = {}

    async def connection(share: list[bytes]) -> None:
        conn = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in share:
                status, keep = await asyncio.wait_for(_exchange(conn, request), 60)
                codes[status] = codes.get(status, 0) + 1
                if not keep:
                    conn[1].close()
                    conn = await asyncio.open_connection("127.0.0.1", port)
        finally:
            conn[1].close()

    await asyncio.gather(*(connection(requests[i::16]) for i in range(16)))
    return codes


@pytest.mark.timeout(900)
def test_soak_memory_fds_threads_stable(tmp_path: Path):
    (tmp_path / "resnet20-12fca82f.th").symlink_to(CIFAR_WEIGHTS / "resnet20-12fca82f.th")
    port = free_port()
    env = {
        **os.environ, "IMGCLS_MODELS": "cifar10_resnet20,cifar10_plain20", "PORT": str(port),
        "IMGCLS_WEIGHTS_DIR": str(tmp_path), "IMGCLS_ALLOW_RANDOM_WEIGHTS": "1",
        "IMGCLS_AUTO_DOWNLOAD": "0", "IMGCLS_PRECISION": "fp32", "IMGCLS_COMPILE": "0",
        "IMGCLS_LOG_LEVEL": "warning", "IMGCLS_GRPC_PORT": "0",
    }  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, 120)
        workers = descendants(proc.pid)
        warm = asyncio.run(_drive(url, WARMUP, 1))
        gpu_before = _cuda_memory(url)
        _connections_closed(proc.pid)
        before = {
            "api": _proc_stats(proc.pid),
            **{f"worker{i}": _proc_stats(p) for i, p in enumerate(workers)},
        }
        codes = asyncio.run(_drive(url, TOTAL - WARMUP, 2))
        gpu_after = _cuda_memory(url)
        _connections_closed(proc.pid)
        for device, used in gpu_before.items():  # on a GPU machine: CUDA memory does not grow
            print(
                f"soak {device}: {used / 2**20:.1f} -> {gpu_after[device] / 2**20:.1f} MiB allocated"
            )
            assert gpu_after[device] <= used * 1.05 + 2**20
        after = {
            "api": _proc_stats(proc.pid),
            **{f"worker{i}": _proc_stats(p) for i, p in enumerate(workers)},
        }
        print(f"soak: {TOTAL} requests, statuses {dict(sorted((warm | codes).items()))}")
        for name in before:
            b, a = before[name], after[name]
            growth = 100.0 * (a["rss_kb"] - b["rss_kb"]) / b["rss_kb"]
            print(f"soak {name}: RSS {b['rss_kb'] / 1024:.1f} -> {a['rss_kb'] / 1024:.1f} MiB "
                  f"({growth:+.2f}%), threads {b['threads']} -> {a['threads']}, fds {b['fds']} -> {a['fds']} "
                  f"(+ {b['shm_fds']} -> {a['shm_fds']} shared-memory batches)")  # fmt: skip
            assert growth < 5.0, f"{name} RSS grew {growth:.1f}%"
            assert a["fds"] <= b["fds"] + 2, f"{name} fds {b['fds']} -> {a['fds']}"
            # two models, at most two batches in flight each, both directions
            assert a["shm_fds"] <= 8, f"{name} holds {a['shm_fds']} shared-memory descriptors"
            assert a["threads"] <= b["threads"] + 2, (
                f"{name} threads {b['threads']} -> {a['threads']}"
            )
        assert set(warm) <= {200, 400, 404, 413}, warm
        assert set(codes) <= {200, 400, 404, 413}, codes
        assert descendants(proc.pid) == workers, "a worker was restarted during the soak"
    finally:
        proc.terminate()
        proc.wait(60)
