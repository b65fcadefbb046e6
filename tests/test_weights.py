"""Downloading and verifying checkpoints against a real local HTTP server."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from app import weights
from app.catalog import build_catalog
from tests.conftest import CIFAR_WEIGHTS, ROOT, free_port, needs_shared, run_service


@contextlib.contextmanager
def http_server(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_verifies_generated_checkpoint(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    raw = served / "raw.pth"
    torch.save({"w": torch.arange(10.0)}, raw)
    name = f"tiny-{sha256(raw)[:8]}.pth"
    raw.rename(served / name)
    dest = tmp_path / "weights" / name
    with http_server(served) as url:
        path = weights.download(f"{url}/{name}", dest, sha256(served / name)[:8], progress=False)
    assert path == dest and sha256(dest) == sha256(served / name)
    assert torch.load(dest, weights_only=True)["w"].sum() == 45


def test_corrupted_download_is_rejected_and_leaves_nothing(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    f = served / "model.pth"
    torch.save({"w": torch.ones(1000)}, f)
    prefix = sha256(f)[:8]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    f.write_bytes(bytes(data))
    dest_dir = tmp_path / "weights"
    with http_server(served) as url, pytest.raises(weights.WeightsError, match=r"hash|prefix"):
        weights.download(f"{url}/model.pth", dest_dir / "model.pth", prefix, progress=False)
    assert not dest_dir.exists() or list(dest_dir.iterdir()) == []


def test_unreachable_server_fails_cleanly(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/x.pth"
    with pytest.raises(weights.WeightsError, match="failed"):
        weights.download(url, tmp_path / "x.pth", "abcdef12", progress=False)
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def stalled_server():
    """A server that takes connections and never answers (its backlog holds them)."""
    import socket

    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_a_stalled_server_fails_the_download_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "DOWNLOAD_STALL_S", 0.5)
    with stalled_server() as url, pytest.raises(weights.WeightsError, match="timed out"):
        weights.download(f"{url}/x.pth", tmp_path / "x.pth", "abcdef12", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_body_cut_short_fails_even_without_a_hash(tmp_path):
    """A server that closes the connection before Content-Length bytes: the file is not taken
    for whole (a file whose name publishes no hash has nothing else to catch it)."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))

    def answer_short() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)

    thread = threading.Thread(target=answer_short, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/m.pth"
    try:
        with pytest.raises(weights.WeightsError, match="sent 10 of 1,000 bytes"):
            weights.download(url, tmp_path / "m.pth", None, progress=False)
    finally:
        thread.join(10)
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_a_download_past_its_size_bound_is_stopped(tmp_path):
    """A server that sends without end (no Content-Length) is cut off past the published size
    (and 1%), not read until the time limit or the disk is full, and leaves nothing."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    sent = [0]

    def send_forever() -> None:
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            while sent[0] < 1 << 30:  # stops when the client goes (or at 1 GB: the test fails)
                sent[0] += conn.send(b"x" * 65536)

    thread = threading.Thread(target=send_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/m.pth"
    try:
        with pytest.raises(
            weights.WeightsError,
            match=r"sent over [\d,]+ bytes; .* is 1,000,000 bytes \(refused past 1,010,000\)",
        ):
            weights.download(url, tmp_path / "m.pth", None, progress=False, published_bytes=10**6)
    finally:
        thread.join(10)
        server.close()
    assert sent[0] < 64 * 1024 * 1024, f"the server sent {sent[0]:,} bytes"
    assert list(tmp_path.iterdir()) == []


def test_a_mirror_announcing_more_than_the_published_size_is_refused(tmp_path):
    """torchvision publishes each checkpoint's size: a mirror whose file is larger (here 100 MB
    for resnet18's 44.7 MB) is refused from its Content-Length, before a byte is stored."""
    spec = build_catalog().get("resnet18")
    assert spec.weights_bytes is not None and 44 << 20 < spec.weights_bytes < 45 << 20
    served = tmp_path / "served"
    served.mkdir()
    with (served / Path(spec.weights_url or "").name).open("wb") as f:
        f.truncate(100 << 20)  # sparse: nothing written
    with http_server(served) as url, pytest.raises(weights.WeightsError, match="announces"):
        weights.pull(spec, tmp_path / "w", mirror=url, progress=False)
    assert not (tmp_path / "w").exists() or list((tmp_path / "w").iterdir()) == []


def test_a_slow_download_is_on_disk_as_it_comes(tmp_path):
    """What a slow server sends is written as it arrives, so the temporary file's time says
    the download is alive: buffered, a server sending under ~90 bytes/s left it untouched, and
    another download of the file removed it as abandoned while it was being written."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    go_on = threading.Event()

    def answer_slowly() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b"x" * 10)
            go_on.wait(30)
            conn.sendall(b"y" * 10)

    thread = threading.Thread(target=answer_slowly, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/m.pth"
    try:
        with cf.ThreadPoolExecutor(1) as ex:
            done = ex.submit(weights.download, url, tmp_path / "m.pth", None, progress=False)
            deadline = time.monotonic() + 30
            while not [p for p in tmp_path.glob("m.pth.*.partial") if p.stat().st_size == 10]:
                assert time.monotonic() < deadline, list(tmp_path.iterdir())
                time.sleep(0.02)
            go_on.set()
            assert done.result().read_bytes() == b"x" * 10 + b"y" * 10
    finally:
        go_on.set()
        thread.join(10)
        server.close()


def test_a_folder_where_the_checkpoint_belongs_is_refused(tmp_path):
    """A folder where the checkpoint belongs (Docker makes one for a bind mount of a host file
    that does not exist) is not taken for the checkpoint: `imgcls weights pull` said "sha256
    verified" and exited 0."""
    spec = build_catalog().get("cifar10_resnet20")
    path = spec.weights_path(tmp_path)
    assert path is not None
    path.mkdir(parents=True)
    with pytest.raises(weights.WeightsError, match="is not a file"):
        weights.pull(spec, tmp_path, progress=False)
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "weights", "pull", "cifar10_resnet20"],
        env={**os.environ, "IMGCLS_WEIGHTS_DIR": str(tmp_path)},
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "is not a file" in r.stderr, (r.returncode, r.stderr[-2000:])
    assert path.is_dir()  # left as it was


def test_temporary_files_of_dead_downloads_are_removed(tmp_path):
    """A download killed outright leaves its temporary file; the next download of that file
    removes it once nothing has written to it for longer than a live download may stay silent,
    and leaves one that is being written (whatever host or process it names)."""
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"w": torch.ones(3)}, served / "m.pth")
    dest = tmp_path / "w" / "m.pth"
    dest.parent.mkdir()
    idle = dest.with_name("m.pth.some.host.123.1a2b3c4d.partial")
    busy = dest.with_name("m.pth.some.host.456.1a2b3c4d.partial")
    for f in (idle, busy):
        f.write_bytes(b"x")
    then = time.time() - weights.ABANDONED_AFTER_S - 10
    os.utime(idle, (then, then))
    with http_server(served) as url:
        weights.download(f"{url}/m.pth", dest, None, progress=False)
    assert dest.is_file() and not idle.exists() and busy.exists()


def test_two_downloads_of_one_file_at_once_share_it(tmp_path):
    """Two models that share a checkpoint (resnet50 and resnet50:IMAGENET1K_V2) may download it
    at the same time: one download, and both get the whole, verified file."""
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"w": torch.arange(100_000.0)}, served / "m.pth")
    prefix = sha256(served / "m.pth")[:8]
    dest = tmp_path / "w" / "m.pth"
    with http_server(served) as url, cf.ThreadPoolExecutor(4) as ex:
        paths = list(ex.map(lambda _: weights.download(f"{url}/m.pth", dest, prefix,
                                                        progress=False), range(4)))  # fmt: skip
    assert paths == [dest] * 4 and sha256(dest).startswith(prefix)
    assert sorted(os.listdir(dest.parent)) == ["m.pth"]


@needs_shared
def test_cli_pull_repairs_a_corrupted_file_and_says_what_it_verified(tmp_path):
    """A file already there is checked against its published hash: a corrupted one is replaced
    by a good download. A file whose name publishes no hash is said to be unverified."""
    dest = tmp_path / "w"
    dest.mkdir()
    (dest / "resnet20-12fca82f.th").write_bytes(b"junk")
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(CIFAR_WEIGHTS / "resnet20-12fca82f.th", served)
    (served / "resnet18_fbgemm_16fa66dd.pth").write_bytes(b"any bytes at all")

    def pull(name: str, url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "weights", "pull", name, "--dir", str(dest),
             "--mirror", url, "--quiet"],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip

    with http_server(served) as url:
        r = pull("cifar10_resnet20", url)
        assert r.returncode == 0 and "(sha256 verified)" in r.stdout, r.stderr
        assert sha256(dest / "resnet20-12fca82f.th").startswith("12fca82f")
        r = pull("resnet18:int8", url)
        assert r.returncode == 0, r.stderr
        assert "not verified: no sha256 is published" in r.stdout
        assert "sha256 verified" not in r.stdout
    listing = subprocess.run(
        [sys.executable, "-m", "app.cli", "weights", "list", "--dir", str(dest)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert "resnet18:int8" in listing.stdout and "resnet50:int8" in listing.stdout


@needs_shared
def test_cli_pull_from_mirror_verifies_and_is_idempotent(tmp_path):
    """`imgcls weights pull` against a local mirror holding the real CIFAR checkpoint."""
    dest = tmp_path / "w"
    cmd = [
        sys.executable,
        "-m",
        "app.cli",
        "weights",
        "pull",
        "cifar10_resnet20",
        "--dir",
        str(dest),
    ]
    with http_server(CIFAR_WEIGHTS) as url:
        first = subprocess.run([*cmd, "--mirror", url], capture_output=True, text=True, cwd=ROOT)
        assert first.returncode == 0, first.stderr
        assert "sha256 verified" in first.stdout
        f = dest / "resnet20-12fca82f.th"
        assert sha256(f).startswith("12fca82f")
        mtime = f.stat().st_mtime_ns
        again = subprocess.run([*cmd, "--mirror", url], capture_output=True, text=True, cwd=ROOT)
        assert again.returncode == 0 and f.stat().st_mtime_ns == mtime
    listing = subprocess.run(
        [sys.executable, "-m", "app.cli", "weights", "list", "--dir", str(dest)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert "cifar10_resnet20" in listing.stdout and "present" in listing.stdout
    assert "cifar10_resnet32" in listing.stdout and "missing" in listing.stdout


@needs_shared
def test_cli_pull_rejects_corrupted_mirror(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    data = bytearray((CIFAR_WEIGHTS / "resnet20-12fca82f.th").read_bytes())
    data[1000] ^= 0x01
    (served / "resnet20-12fca82f.th").write_bytes(bytes(data))
    dest = tmp_path / "w"
    with http_server(served) as url:
        r = subprocess.run(
            [sys.executable, "-m", "app.cli", "weights", "pull", "cifar10_resnet20",
             "--dir", str(dest), "--mirror", url, "--quiet"],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
    assert r.returncode == 1
    assert "hash" in r.stderr.lower() or "prefix" in r.stderr.lower()
    assert not dest.exists() or list(dest.iterdir()) == []


def test_resolve_offline_reports_the_fix(tmp_path):
    spec = build_catalog().get("resnet50")
    with pytest.raises(weights.WeightsError, match="imgcls weights pull resnet50"):
        weights.resolve(
            spec, tmp_path, auto_download=True, allow_random=False,
            mirror=f"http://127.0.0.1:{free_port()}",
        )  # fmt: skip
    assert weights.resolve(spec, tmp_path, auto_download=False, allow_random=True) is None


def test_checkpoint_formats(tmp_path):
    from app.catalog.cifar import cifar_resnet

    model = cifar_resnet(20)
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if "num_batches" not in k}
    torch.save({"state_dict": sd, "best_prec1": 90.0}, tmp_path / "wrapped.th")
    fresh = cifar_resnet(20)
    weights.load_into(fresh, tmp_path / "wrapped.th")
    assert torch.equal(fresh.linear.weight, model.linear.weight)
    torch.save({"nope": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(weights.WeightsError, match="keys"):
        weights.load_into(cifar_resnet(20), tmp_path / "wrong.pt")


@needs_shared
def test_service_downloads_missing_weights_at_startup(tmp_path):
    """IMGCLS_AUTO_DOWNLOAD: a missing checkpoint is fetched (from a local mirror) and served."""
    with (
        http_server(CIFAR_WEIGHTS) as url,
        run_service(
            models="cifar10_resnet20", weights_dir=tmp_path, auto_download=True, weights_mirror=url
        ) as svc,
    ):
        assert (tmp_path / "resnet20-12fca82f.th").is_file()
        entry = httpx.get(f"{svc.url}/models/cifar10_resnet20").json()
        assert entry["status"] == "ready" and entry["weights"] == "resnet20-12fca82f.th"


def test_a_download_under_way_at_shutdown_stops_and_leaves_nothing(tmp_path):
    """The service stopped (SIGTERM) while a model's weights trickle in: the download stops and
    its temporary file is removed (uvicorn re-raises the signal after the shutdown, so the
    process dies before a thread's own clean-up could run: the file stayed behind)."""
    import time

    stopped = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # 10 MB announced, 100 KB/s sent
            self.send_response(200)
            self.send_header("Content-Length", str(10_000_000))
            self.end_headers()
            try:
                for _ in range(10_000):
                    self.wfile.write(b"x" * 1000)
                    self.wfile.flush()
                    time.sleep(0.01)
            except OSError:
                stopped.set()  # the client went

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with run_service(
            wait_ready=False, models="cifar10_resnet20", weights_dir=tmp_path, auto_download=True,
            weights_mirror=f"http://127.0.0.1:{server.server_address[1]}",
        ):  # fmt: skip
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob("*.partial")):
                assert time.monotonic() < deadline, "the download never began"
                time.sleep(0.05)
        assert list(tmp_path.iterdir()) == []  # right after the shutdown, before any thread
        assert stopped.wait(10), "the download went on after the shutdown"
    finally:
        server.shutdown()
        server.server_close()


@needs_shared
def test_a_stalled_mirror_holds_back_only_the_model_it_would_serve(tmp_path):
    """A model whose weights are here serves while another's download waits on a mirror that
    does not answer; that one fails as missing weights when the mirror lets go (here: closes)."""
    import socket
    import time

    from tests import images

    shutil.copy(CIFAR_WEIGHTS / "resnet20-12fca82f.th", tmp_path)
    png = images.encode(images.photo(), "PNG")
    mirror = socket.create_server(("127.0.0.1", 0), backlog=16)  # takes connections, never answers
    try:
        with run_service(
            wait_ready=False, models="cifar10_resnet56,cifar10_resnet20", weights_dir=tmp_path,
            auto_download=True, weights_mirror=f"http://127.0.0.1:{mirror.getsockname()[1]}",
        ) as svc:  # fmt: skip
            c = httpx.Client(base_url=svc.url, timeout=60)
            deadline = time.monotonic() + 120
            while c.get("/models/cifar10_resnet20").json()["status"] != "ready":
                assert time.monotonic() < deadline, "the model with its weights here never served"
                time.sleep(0.1)
            ok = c.post("/classify", params={"model": "cifar10_resnet20"},
                        files={"file": ("x.png", png)})  # fmt: skip
            assert ok.status_code == 200, ok.text
            waiting = c.get("/models/cifar10_resnet56").json()
            assert (waiting["status"], waiting["reason"]) == ("loading", "downloading weights")
            mirror.close()  # the waiting download is reset
            while (entry := c.get("/models/cifar10_resnet56").json())["status"] == "loading":
                assert time.monotonic() < deadline, entry
                time.sleep(0.1)
            assert entry["status"] == "missing-weights", entry
            assert "download of" in entry["reason"], entry
    finally:
        mirror.close()
    assert sorted(os.listdir(tmp_path)) == ["resnet20-12fca82f.th"]


@needs_shared
def test_missing_weights_are_reported_and_others_still_serve(tmp_path):
    shutil.copy(CIFAR_WEIGHTS / "resnet20-12fca82f.th", tmp_path)
    with run_service(
        wait_ready=False,
        models="cifar10_resnet20,resnet18",
        weights_dir=tmp_path,
        auto_download=True,
        weights_mirror=f"http://127.0.0.1:{free_port()}",  # offline
    ) as svc:
        c = httpx.Client(base_url=svc.url, timeout=60)
        for _ in range(600):
            entry = c.get("/models/cifar10_resnet20").json()
            if entry["status"] == "ready":
                break
            import time

            time.sleep(0.1)
        r18 = c.get("/models/resnet18").json()
        assert r18["status"] == "missing-weights"
        assert "imgcls weights pull resnet18" in r18["reason"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "resnet18" in ready.text
        from tests import images

        png = images.encode(images.photo(), "PNG")
        r = c.post("/classify", params={"model": "resnet18"}, files={"file": ("x.png", png)})
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert "missing-weights" in r.json()["detail"] and "/models/resnet18" in r.json()["detail"]
        ok = c.post(
            "/classify", params={"model": "cifar10_resnet20"}, files={"file": ("x.png", png)}
        )
        assert ok.status_code == 200
    assert os.listdir(tmp_path) == ["resnet20-12fca82f.th"]


@pytest.mark.parametrize(
    ("error", "problem"),
    [
        (OSError(30, "Read-only file system"), "failed"),  # a read-only volume (root too)
        (OSError(28, "No space left on device"), "failed"),
        (PermissionError(13, "Permission denied"), "failed"),
        (ConnectionResetError(104, "Connection reset by peer"), "missing-weights"),
        (OSError("the server sent 10 of 20 bytes"), "missing-weights"),
    ],
)
def test_what_the_volume_refuses_is_failed_and_the_network_missing(tmp_path, monkeypatch,
                                                                    error, problem):  # fmt: skip
    """Writing the file fails on this machine's volume (read-only, full, no permission): the
    model is `failed`, which no download or `weights pull` can mend. A network error leaves it
    `missing-weights`, to fetch again. (The errors are raised where the file is written: a
    read-only mount or a full disk cannot be made here without privileges.)"""
    from app import weights

    def fetch(url, tmp, *args):
        raise error

    monkeypatch.setattr(weights, "_fetch", fetch)
    with pytest.raises(weights.WeightsError) as info:
        weights.download("http://127.0.0.1:9/x.pth", tmp_path / "x.pth", None, progress=False)
    assert info.value.problem == problem, info.value
    assert ("cannot write" in str(info.value)) == (problem == "failed")
