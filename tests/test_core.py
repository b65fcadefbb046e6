"""The service core: admission before the body is read, one core behind every front-end, and an
import graph that reads top-down."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests import images
from tests.conftest import ROOT, run_service

PNG = images.encode(images.photo((64, 64)), "PNG")


def _imports(path: Path, package: str) -> set[str]:
    """The app modules a module imports at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("app"))
            elif isinstance(child, ast.ImportFrom) and child.module:
                module = child.module
                if child.level:  # relative
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join([*base, module])
                if module.startswith("app"):
                    found.add(module)
                    found.update(f"{module}.{a.name}" for a in child.names)
                    found.add(f"{module}:names")
            visit(child)

    visit(tree)
    return found


def _names(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for a in node.names
    ]


def test_import_graph_has_no_cycles():
    modules: dict[str, Path] = {}
    for path in (ROOT / "app").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    assert "app.core" in modules and "app.engine.pool" in modules
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = _imports(path, package)
        deps = set()
        for d in found:
            if d in modules and d != name:
                deps.add(d)
        # `from app.x import a, b`: when a and b are submodules, the edges go to them; when
        # they are names, to app.x (its __init__). A package's own ancestors are not edges:
        # Python runs them first whatever the module does.
        for d in [d for d in deps if f"{d}:names" in found]:
            names = _names(path, d)
            if names and all(f"{d}.{n}" in modules for n in names):
                deps.discard(d)
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if seen.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in seen:
                dfs(dep)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            dfs(node)


def test_front_ends_are_thin():
    """The routes and the Ray ingress call the core; neither decodes, builds results or picks a
    weights label itself."""
    for path in (ROOT / "app" / "api" / "inference.py", ROOT / "app" / "ray_app.py"):
        text = path.read_text()
        for needle in ("decode_pixels", "classify_result", "compare_response", "weights_name"):
            assert needle not in text, f"{path.name} uses {needle}: that is the core's job"
    core = (ROOT / "app" / "core.py").read_text()
    assert "fastapi" not in core and "starlette" not in core
    assert "fastapi" not in (ROOT / "app" / "errors.py").read_text()


def test_full_queue_is_refused_before_the_body_is_read(tmp_path):
    """With the model's queue full, a request is answered 503 + Retry-After from its headers
    alone: the client never has to send its (large) body."""
    with run_service(
        models="cifar10_plain20", allow_random_weights=True, weights_dir=tmp_path, max_queue=2,
        max_batch_size=1, worker_timeout_s=120, request_timeout_s=60,
    ) as svc:  # fmt: skip
        pool = svc.service.pool
        pid = pool.workers[0].pid
        os.kill(pid, signal.SIGSTOP)  # the worker holds two batches; the queue fills behind them
        try:
            import concurrent.futures as cf

            batcher = svc.service.batchers["cifar10_plain20"]
            with cf.ThreadPoolExecutor(4) as ex:
                held = []
                # One at a time: sent at once, a third could find the queue full before the
                # batcher moved the first two to the worker, and be refused by this very check.
                for n in range(1, 5):
                    held.append(
                        ex.submit(httpx.post, f"{svc.url}/classify",
                                  files={"file": ("x.png", PNG)}, timeout=60)
                    )  # fmt: skip
                    deadline = time.monotonic() + 30
                    while (
                        batcher.depth + len(batcher._running) < n
                        and time.monotonic() < deadline
                        and not held[-1].done()
                    ):
                        time.sleep(0.01)
                assert len(batcher._running) == 2 and batcher.depth == 2
                port = int(svc.url.rsplit(":", 1)[1])
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(
                        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
                        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
                    )  # headers only: the 10 MB body is never sent
                    t0 = time.monotonic()
                    head = s.recv(4096).decode("latin-1")
                    waited = time.monotonic() - t0
                assert head.startswith("HTTP/1.1 503"), head
                assert "retry-after" in head.lower() and waited < 5
                os.kill(pid, signal.SIGCONT)
                codes = [f.result().status_code for f in held]
            assert codes == [200] * 4
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# ---- the API process's budget of decoded pixels ----------------------------------------------
def test_decode_memory_serves_in_order_and_lets_go_of_what_it_gave():
    """First come, first served; one request over the whole budget runs alone; a waiter that
    gives up (its deadline) lets those behind it through; bytes granted to a request cancelled
    at that moment go back."""
    import asyncio

    from app.core import DecodeMemory

    async def scenario() -> None:
        memory = DecodeMemory(100)
        order: list[str] = []

        async def decode(name: str, n: int, hold: asyncio.Event) -> None:
            held = await memory.take(n)
            order.append(name)
            await hold.wait()
            memory.release(held)

        holds = {name: asyncio.Event() for name in "abcd"}
        a = asyncio.create_task(decode("a", 60, holds["a"]))
        await asyncio.sleep(0)
        assert not a.done()
        b = asyncio.create_task(decode("b", 50, holds["b"]))  # 110 > 100: waits
        c = asyncio.create_task(decode("c", 10, holds["c"]))  # fits, but b came first
        await asyncio.sleep(0.01)
        assert order == ["a"] and memory.used == 60
        holds["a"].set()
        await a
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c"] and memory.used == 60
        big = asyncio.create_task(decode("big", 10_000, holds["d"]))  # taken as the whole 100
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c"]
        late = asyncio.create_task(memory.take(1))  # behind big
        await asyncio.sleep(0.01)
        holds["b"].set(), holds["c"].set()
        await asyncio.gather(b, c)
        await asyncio.sleep(0.01)
        assert order[-1] == "big" and memory.used == 100 and not late.done()
        late.cancel()  # gave up while waiting: gone from the line
        holds["d"].set()
        await big
        assert memory.used == 0
        # a waiter granted its bytes and cancelled before it ran gives them back
        first = await memory.take(100)
        granted = asyncio.create_task(memory.take(40))
        await asyncio.sleep(0.01)
        memory.release(first)  # grants 40 to ``granted``...
        granted.cancel()  # ...which is cancelled before it resumes
        with contextlib.suppress(asyncio.CancelledError):
            await granted
        assert memory.used == 0
        assert await memory.take(100) == 100  # nothing lost, nothing left waiting
        # a waiter cancelled (its deadline) just before bytes are released, its task not yet
        # woken: skipped, and those behind it served (it used to take the bytes for ever)
        first = asyncio.create_task(memory.take(60))
        second = asyncio.create_task(memory.take(40))
        await asyncio.sleep(0.01)
        first.cancel()
        memory.release(100)
        with contextlib.suppress(asyncio.CancelledError):
            await first
        assert await second == 40 and memory.used == 40
        memory.release(40)
        assert memory.used == 0 and not memory._waiting

    asyncio.run(scenario())


def _peak_kb() -> int:
    """This process's peak resident memory since the last reset (VmHWM), in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))


def test_concurrent_large_decodes_wait_for_the_decode_budget(tmp_path):
    """Six /compare calls of a 36-megapixel PNG at once (a 0.2 MB upload each): the API process
    decodes one at a time within an IMGCLS_DECODE_MEMORY_MB of one image's bound, its peak
    memory growing by one decoded image, within that budget, where asyncio's pool (6 threads
    here) held five or six before. Every call is answered."""
    import concurrent.futures as cf

    from app.imaging import peak_bytes, probe

    side = 6000
    grid = np.add.outer(np.arange(side) // 600, np.arange(side) // 600).astype(np.uint8) * 20
    upload = images.encode(Image.fromarray(np.stack([grid] * 3, axis=-1)), "PNG")
    assert len(upload) < 2_000_000
    bound = peak_bytes(probe(upload, 40_000_000), None)  # no draft: the largest bound
    with run_service(
        models="cifar10_plain20,cifar10_plain32", allow_random_weights=True, weights_dir=tmp_path,
        decode_memory_mb=bound / 2**20, request_timeout_s=120,
    ) as svc:  # fmt: skip
        post = lambda: httpx.post(  # noqa: E731
            f"{svc.url}/compare", files={"file": ("big.png", upload)}, timeout=180
        )
        assert post().status_code == 200  # warm: the first call's one-off allocations
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak from here
        before = _peak_kb() * 1024
        with cf.ThreadPoolExecutor(6) as ex:
            codes = [f.result().status_code for f in [ex.submit(post) for _ in range(6)]]
        grew = _peak_kb() * 1024 - before
    decoded = side * side * 4  # Pillow's RGB: 4 bytes a pixel
    print(f"peak grew {grew / 2**20:.0f} MB; one decoded image {decoded / 2**20:.0f} MB, "
          f"its bound {bound / 2**20:.0f} MB")  # fmt: skip
    assert codes == [200] * 6
    # the budget holds one image's bound: one decode at a time, about one decoded image of
    # growth (144 MB here); without it, five or six at once (0.7 GB)
    assert grew < min(bound, 2 * decoded)


def test_the_images_of_a_request_are_queued_together(tmp_path):
    """N images are admitted and queued all at once: of two requests of 3 images that find 4
    places, one is refused whole (503, none of its images queued, none counted failed). Queued
    one by one in tasks after the check, both passed it, and one lost its second image to the
    full queue: an element error, its first image queued for nobody and counted failed."""
    import torch

    from app.engine.batcher import QueueFullError
    from app.service import Service
    from app.settings import Settings

    name = "cifar10_plain20"
    settings = Settings(
        models=name, allow_random_weights=True, weights_dir=tmp_path, auto_download=False,
        device="cpu", precision="fp32", compile=False, grpc_port=0, max_queue=4,
        max_batch_size=32, max_batch_wait_ms=1000,  # the queue holds them while both arrive
    )  # fmt: skip

    async def scenario() -> tuple[list[object], int]:
        service = Service(settings)
        await service.start()
        try:
            deadline = time.monotonic() + 120
            while name not in service.ready_models():
                assert time.monotonic() < deadline, "the model did not load"
                await asyncio.sleep(0.05)
            pixels = [torch.zeros(3, 32, 32, dtype=torch.uint8) for _ in range(3)]
            outcomes = await asyncio.gather(
                service.infer(name, pixels), service.infer(name, pixels), return_exceptions=True
            )
            return list(outcomes), service.batchers[name].stats.fail.count
        finally:
            await service.stop()

    outcomes, failed = asyncio.run(scenario())
    answered = [o for o in outcomes if isinstance(o, list)]
    refused = [o for o in outcomes if not isinstance(o, list)]
    assert len(answered) == 1 and len(answered[0]) == 3, outcomes
    assert len(refused) == 1 and type(refused[0]) is QueueFullError, outcomes
    assert failed == 0
