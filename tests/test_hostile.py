"""Issue 16's reproductions, each against a real uvicorn: decode budgets (the progressive-JPEG
scan bomb), multipart parsing off the event loop, the last reachable 500s, memory after large
images, lookups that must not change the catalog, the API key scheme in any case, and error
messages that do not echo 10 KB of input."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app import imaging, memory
from tests import images
from tests.conftest import (
    CIFAR_WEIGHTS,
    IMAGES,
    Running,
    needs_shared,
    require_shared,
    run_service,
)

MODELS = ["cifar10_resnet20", "cifar10_resnet56"]
KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def hostile() -> Iterator[Running]:
    require_shared(CIFAR_WEIGHTS)
    with run_service(
        models=",".join(MODELS),
        weights_dir=CIFAR_WEIGHTS,
        max_upload_mb=21,  # the 20.7 MB multipart flood below is not refused for its size
        api_key=KEY,
    ) as running:
        yield running


@pytest.fixture
def client(hostile: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile.url, timeout=120, headers=AUTH) as c:
        yield c


def small_png() -> bytes:
    return images.encode(images.photo(), "PNG")


# ---- 1. decode budgets ----------------------------------------------------------------------
def test_scan_bomb_is_refused_fast_and_every_model_keeps_its_latency(client):
    bomb = images.jpeg_scan_bomb()
    assert 550_000 < len(bomb) < 650_000 and bomb.count(b"\xff\xda") > 20_000

    def classify(model: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = client.post(
            "/classify", params={"model": model}, files={"file": ("x.png", small_png())}
        )
        return r.status_code, time.perf_counter() - t0

    for m in MODELS:  # warm: first requests pay for lazy set-up
        assert classify(m)[0] == 200
    baseline = [classify(m)[1] for _ in range(3) for m in MODELS]
    during: list[tuple[int, float]] = []
    done = threading.Event()

    def others() -> None:  # requests to every model while the bomb is in flight, and after
        while not done.is_set() or len(during) < 4 * len(MODELS):
            during.extend(classify(m) for m in MODELS)

    with ThreadPoolExecutor(2) as pool:
        background = pool.submit(others)
        t0 = time.perf_counter()
        r = client.post("/classify", params={"model": MODELS[0]}, files={"file": ("b.jpg", bomb)})
        bomb_s = time.perf_counter() - t0
        compare = client.post("/compare", files={"file": ("b.jpg", bomb)})  # decoded in the API
        done.set()
        background.result(timeout=120)
    print(f"bomb answered in {bomb_s:.3f} s; others: baseline max {max(baseline):.3f} s, "
          f"during max {max(s for _, s in during):.3f} s over {len(during)} requests")  # fmt: skip
    assert r.status_code == 400 and "scans" in r.json()["detail"], r.text
    assert bomb_s < 2.0
    assert compare.status_code == 400 and "scans" in compare.json()["detail"], compare.text
    assert {status for status, _ in during} == {200}
    # Generous (a shared 2-core machine varies tenfold); before the fix the bomb held the worker
    # for a minute and these requests waited until their 30 s deadline (504).
    assert max(s for _, s in during) < max(5.0, 2 * max(baseline))


def test_structure_budgets_refuse_amplifying_files_and_pass_ordinary_ones():
    def refused(data: bytes, words: str) -> None:
        with pytest.raises(imaging.ImageBudgetError, match=words):
            imaging.probe(data, 40_000_000)

    refused(images.jpeg_scan_bomb(repeats=10), "more than 100 scans")  # 110 scans
    assert imaging.decode(images.jpeg_scan_bomb(repeats=9), 40_000_000).size == (
        6000,
        6000,
    )  # 100: decoded
    refused(images.jpeg_marker_flood(1001), "marker segments")
    refused(images.png_chunk_flood(1001), "chunks")
    png = images.encode(images.photo(), "PNG")
    idat = png.index(b"IDAT") - 4
    idats = images.png_chunk(b"IDAT", b"") * 20_001
    refused(png[:idat] + idats + png[idat:], "chunks")
    refused(images.gif_block_flood(10_001), "blocks")
    jpeg = images.encode(images.photo(), "JPEG")
    # Ordinary files: progressive JPEG, JPEG whose EXIF holds 200 SOS-like byte pairs (not
    # scans: they sit inside an APP1 segment), PNG, animated GIF.
    progressive = images.encode(images.photo((300, 200)), "JPEG", progressive=True)
    exif = b"Exif\x00\x00" + b"\xff\xda" * 200
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    gif_anim = images.encode(
        images.photo(), "GIF", save_all=True, append_images=[images.photo().rotate(90)] * 3
    )
    for ok in (progressive, jpeg[:2] + app1 + jpeg[2:], png, gif_anim):
        imaging.decode(ok, 40_000_000)


def test_only_the_accepted_formats_parsers_see_an_upload(monkeypatch, client):
    """Pillow's EPS plugin reads a whole file, line by line in Python, when it opens one (20 s
    for 20 MB): an upload is never offered to a plugin for a format the service refuses anyway.
    Each such plugin here fails the test if it is asked."""
    from PIL import EpsImagePlugin, PpmImagePlugin, PsdImagePlugin

    asked: list[str] = []

    def refuse(plugin: str):
        def _open(self: object) -> None:
            asked.append(plugin)
            raise AssertionError(f"the {plugin} plugin parsed an upload")

        return _open

    for cls in (EpsImagePlugin.EpsImageFile, PpmImagePlugin.PpmImageFile,
                PsdImagePlugin.PsdImageFile):  # fmt: skip
        monkeypatch.setattr(cls, "_open", refuse(cls.format))
    uploads = {
        "EPS": images.eps(2_000_000),
        "PPM": images.encode(images.photo(), "PPM"),
        "PSD": b"8BPS\x00\x01" + bytes(40),
    }
    for data in uploads.values():
        with pytest.raises(imaging.ImageError, match="not a readable image in an accepted format"):
            imaging.probe(data, 40_000_000)
    assert asked == []
    r = client.post("/classify", files={"file": ("x.eps", uploads["EPS"])})
    assert r.status_code == 400 and "accepted format" in r.json()["detail"], r.text


def test_tiff_strip_flood_is_refused_unread_and_ordinary_strips_pass(client):
    """A 1.6 MB TIFF declaring 200,000 one-row strips (all pointing at the same row) is refused
    from its directory, before Pillow builds an object per strip (2.4 million took 5 s and
    750 MB); a TIFF in 2,000 one-row strips is an ordinary image."""
    flood = images.tiff_strips(16, 200_000, shared=True)
    assert len(flood) < 2_000_000
    with pytest.raises(imaging.ImageBudgetError, match="tag 273 holds 200,000 values"):
        imaging.probe(flood, 40_000_000)
    # offsets of one byte each (BYTE fields): one strip per byte of the file, refused alike
    with pytest.raises(imaging.ImageBudgetError, match="tag 273 holds 1,000,000 values"):
        imaging.probe(images.tiff_strips(1, 1_000_000, shared=True, kind=1), 40_000_000)
    r = client.post("/classify", files={"file": ("x.tif", flood)})
    assert r.status_code == 400 and "refused unread" in r.json()["detail"], r.text
    ordinary = images.tiff_strips(300, 2000)
    image = imaging.decode(ordinary, 40_000_000)
    assert image.size == (300, 2000) and image.getpixel((5, 0)) == (5, 5, 5)
    r = client.post("/classify", files={"file": ("x.tif", ordinary)})
    assert r.status_code == 200, r.text


def test_decode_time_budget_stops_a_long_decode():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (2000, 3000, 3), dtype=np.uint8))
    data = images.encode(noisy, "JPEG", quality=95, progressive=True)  # ~5 MB, ~0.3 s to decode
    t0 = time.perf_counter()
    with pytest.raises(imaging.ImageBudgetError, match=r"0\.02 s budget"):
        imaging.decode(data, 40_000_000, budget_s=0.02)
    assert time.perf_counter() - t0 < 0.5  # stopped within a block of work, not at the end
    assert imaging.decode(data, 40_000_000).size == (3000, 2000)  # the default budget suffices


# ---- 3. multipart parsing off the event loop ------------------------------------------------
def test_multipart_part_flood_is_refused_without_blocking_the_loop(hostile):
    boundary = "abc"  # 53 bytes a part: 390,000 parts make the 20.7 MB
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'.encode()
    form = (
        part * 390_000
        + (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        ).encode()
        + small_png()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    assert 20_000_000 < len(form) < 21 * 1024 * 1024

    probes: list[tuple[float, float]] = []  # (start, end) of each /healthz, back to back
    done = threading.Event()

    def probe_health() -> None:
        with httpx.Client(base_url=hostile.url, timeout=30) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                probes.append((t0, time.perf_counter()))

    watcher = threading.Thread(target=probe_health)
    watcher.start()
    deadline = time.monotonic() + 30
    while not probes and time.monotonic() < deadline:  # the prober is running
        time.sleep(0.005)
    try:
        start = time.perf_counter()
        r = httpx.post(
            f"{hostile.url}/classify",
            content=form,
            headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            timeout=120,
        )
        end = time.perf_counter()
    finally:
        done.set()
        watcher.join()
    during = [b - a for a, b in probes if a < end and b > start]  # probes overlapping the form
    print(f"/healthz during the flood: max {max(during) * 1000:.0f} ms over {len(during)}")
    assert r.status_code == 400 and "more than 16 parts" in r.json()["detail"], r.text
    # Probes run back to back, so at least one overlaps the form, however short its handling.
    assert during and max(during) < 0.5


# ---- 5. no 500 from any input ---------------------------------------------------------------
def test_boundary_longer_than_256_is_400(client):
    boundary = "b" * 300
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--{boundary}--\r\n'
    r = client.post(
        "/classify",
        content=body.encode(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 400 and "malformed multipart body" in r.json()["detail"], r.text


@pytest.mark.parametrize("how", ["lookup", "classify", "compare"])
def test_weights_variant_without_categories_is_404(client, how):
    name = "vgg16:IMAGENET1K_FEATURES"
    if how == "lookup":
        r = client.get(f"/models/{name}")
    else:
        params = {"model": name} if how == "classify" else {"models": f"{MODELS[0]},{name}"}
        r = client.post(f"/{how}", params=params, files={"file": ("x.png", small_png())})
    assert r.status_code == 404, r.text
    detail = r.json()["detail"]
    assert "without class labels" in detail and "vgg16:IMAGENET1K_V1" in detail


# ---- 6. memory after large images ----------------------------------------------------------
def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def forty_megapixel_jpeg() -> bytes:
    """A real photo at 7300 x 5470 (39.9 MP) with a little noise, as a camera JPEG (~4 MB)."""
    photo = Image.open(IMAGES / "astronaut.png").convert("RGB").resize((7300, 5470))
    arr = np.asarray(photo).astype(np.int16)
    arr += np.random.default_rng(0).integers(-6, 7, arr.shape, dtype=np.int16)
    return images.encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "JPEG", quality=85)


def flat_36_megapixel_png() -> bytes:
    """6000 x 6000 RGB in flat squares: ~0.1 MB of PNG, 137 MB of decoded pixels (box-reduced
    after decoding, where a JPEG is decoded at a reduced scale)."""
    grid = np.add.outer(np.arange(6000) // 600, np.arange(6000) // 600).astype(np.uint8) * 20
    return images.encode(Image.fromarray(np.stack([grid] * 3, axis=-1)), "PNG")


@needs_shared
def test_memory_goes_back_after_40_megapixel_uploads(client, hostile):
    data, png = forty_megapixel_jpeg(), flat_36_megapixel_png()
    small = small_png()
    for path in ("/classify", "/compare"):  # warm both paths with a small image
        assert client.post(path, files={"file": ("x.png", small)}).status_code == 200
    workers = [w.pid for w in hostile.service.pool.workers]
    memory.trim()  # this process is the API process: start from what it really holds
    api_before, workers_before = _rss_mb(), [_rss_mb(p) for p in workers]
    for path in ("/classify", "/classify", "/classify", "/compare", "/compare", "/compare"):
        for name, upload in (("big.jpg", data), ("big.png", png)):  # worker, then API decodes
            r = client.post(path, files={"file": (name, upload)})
            assert r.status_code == 200, r.text
    api_growth = _rss_mb() - api_before
    worker_growth = max(_rss_mb(p) - b for p, b in zip(workers, workers_before, strict=True))
    print(f"after 12 uploads of 36-40 MP: API RSS {api_growth:+.0f} MB, "
          f"worker {worker_growth:+.0f} MB")  # fmt: skip
    # Before the fix: API +325 MB, worker +178 MB (2-core EPYC); after: under +10 MB each. A PNG
    # (box-reduced after a full decode) kept its 137 MB in an arena: API +150, worker +145 MB.
    # Under 15 MB alone; the API process is the test process, whose other threads allocate too:
    # +66 MB once in a whole CI run. The bound stays under every growth the faults made.
    assert api_growth < 100 and worker_growth < 100


# ---- 7. smaller things ----------------------------------------------------------------------
def test_lookups_never_change_the_catalog(client):
    before = [m["name"] for m in client.get("/models").json()["models"]]
    looked_up = ("alexnet:DEFAULT", "resnet50:IMAGENET1K_V1", "resnet50:DEFAULT", "vgg16:nope",
                 "resnet18:int8", "resnet50:int8")  # fmt: skip
    for name in looked_up:
        client.get(f"/models/{name}")
    client.post("/classify", params={"model": "alexnet:DEFAULT"}, files={"file": ("x", b"x")})
    after = [m["name"] for m in client.get("/models").json()["models"]]
    assert after == before
    assert client.get("/models/alexnet:DEFAULT").json()["name"] == "alexnet:DEFAULT"


def test_long_names_are_cut_in_errors(client):
    name = "n" * 10_000
    r = client.get(f"/models/{name}")
    assert r.status_code == 404 and "…" in r.json()["detail"] and len(r.text) < 2_000, r.text[:200]
    r = client.post("/classify", params={"model": name}, files={"file": ("x", b"x")})
    assert r.status_code == 422 and "…" in r.text and len(r.text) < 2_000, r.text[:200]
    r = client.post("/compare", params={"models": name[:1000]}, files={"file": ("x", b"x")})
    assert r.status_code == 422 and len(r.text) < 2_000, r.text[:200]  # one name: not 2 to 8


def test_413_message_names_the_configured_limit(client):
    r = client.post("/classify", files={"file": ("x.png", b"\0" * (22 * 1024 * 1024))})
    assert r.status_code == 413
    assert "IMGCLS_MAX_UPLOAD_MB=21)" in r.json()["detail"], r.text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_in_any_case(hostile, scheme):
    r = httpx.get(f"{hostile.url}/info", headers={"Authorization": f"{scheme} {KEY}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("value", [f"Basic {KEY}", "Bearer wrong", KEY, f"Bearer{KEY}", ""])
def test_wrong_credentials_are_401(hostile, value):
    r = httpx.get(f"{hostile.url}/info", headers={"Authorization": value} if value else {})
    assert r.status_code == 401, r.text


def test_a_refused_key_closes_only_on_a_body_the_service_would_not_take(hostile):
    """401 comes before any body is read: a body over what the service takes (10 GB declared)
    is not read to its end and thrown away, the connection closes; a small one is, and the
    connection serves the next request."""
    from app.limits import largest_body
    from tests.rawhttp import (
        chunk,
        chunked_head,
        connect,
        healthz_on,
        read_response,
        read_until_closed,
        send_endless_chunked,
        status_of,
    )

    def head(length: int) -> bytes:
        return (f"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()  # fmt: skip

    sock = connect(hostile.url)
    try:
        sock.sendall(head(10 * 1024**3) + b"x" * 65536)
        data, _, how = read_until_closed(sock, 15)
    finally:
        sock.close()
    assert status_of(data) == 401 and b"connection: close" in data.lower(), data[:300]
    assert how != "open"
    sock = connect(hostile.url)
    try:
        sock.sendall(head(5000) + b"x" * 5000)
        status, headers, _ = read_response(sock)
        assert status == 401 and headers.get("connection") != "close"
        assert healthz_on(sock)[0] == 200
        # chunked (of unknown size): read and thrown away as well, the connection kept
        sock.sendall(chunked_head("/classify") + chunk(b"x" * 0x40000) * 4 + b"0\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 401 and headers.get("connection") != "close"
        assert healthz_on(sock)[0] == 200
    finally:
        sock.close()
    # an endless one, up to the largest body the service takes: then the connection is closed
    largest = largest_body(hostile.settings)
    sent = send_endless_chunked(hostile.url, "/classify", 8 * largest)
    assert sent < 2 * largest, f"the server read {sent:,} bytes of an endless body"


def test_upload_is_held_once_as_a_view_into_the_body():
    """issue 11 point 7: the file part is a view into the one body buffer, not a copy, and
    exact even when the data holds partial boundaries and line breaks."""
    from app.upload import _parse_multipart
    from tests.rawhttp import multipart

    data = b"\r\n--imgclsbound\r\n" + bytes(range(256)) * 4000 + b"\r\n--imgclsboundar"
    body = bytearray(multipart(data, boundary="imgclsboundary"))
    upload = _parse_multipart(body, b"imgclsboundary", 10**7)
    assert isinstance(upload.data, memoryview) and upload.data.obj is body
    assert bytes(upload.data) == data


@pytest.mark.parametrize(
    "chunks",
    [{"source_size": "09"}, {"source_size": "99", "source_box": "x"}, {"source_box": "0"}],
    ids=["zero-side", "square", "box"],
)
def test_png_text_chunks_cannot_steer_the_resize(client, chunks: dict[str, str]):
    """A PNG's text chunks land in Pillow's ``info``, where a scaled decode records the full
    image's size and region: an upload that names them is decoded as the same image without
    them (a zero side had divided by zero: 400 in the worker, 500 where the API decodes)."""
    from PIL import PngImagePlugin

    from app.catalog import build_catalog
    from app.engine.decoding import decode_pixels

    img = images.photo((120, 90))
    meta = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        meta.add_text(key, value)
    data, plain = images.encode(img, "PNG", pnginfo=meta), images.encode(img, "PNG")
    catalog = build_catalog()  # a squash (CIFAR) and a short-side resize (ImageNet)
    pre = {m: catalog.get(m).transform for m in (MODELS[0], "resnet18")}
    for draft in (False, True):
        got = decode_pixels(data, 10**8, pre, draft)[0]
        want = decode_pixels(plain, 10**8, pre, draft)[0]
        assert all(torch.equal(got[m], want[m]) for m in pre)
    answers = {}
    for name, upload in (("chunks", data), ("plain", plain)):
        r = client.post("/compare", params={"models": ",".join(MODELS)},
                        files={"file": ("x.png", upload)})  # fmt: skip
        assert r.status_code == 200, r.text  # decoded in the API process
        c = client.post("/classify", params={"model": MODELS[0]}, files={"file": ("x.png", upload)})
        assert c.status_code == 200, c.text  # decoded in the worker
        answers[name] = (r.json()["results"][0]["predictions"], c.json()["predictions"])
    assert answers["chunks"] == answers["plain"]


def test_heap_trim_after_a_large_body_runs_off_the_event_loop():
    """``malloc_trim`` takes milliseconds; after a large body (the ASGI size guard, the gRPC
    door) it runs on a thread of its own, not on the loop that serves every connection. Seen
    through a profiler hook on each thread (nothing replaced: the real trim runs)."""
    import asyncio
    import sys

    calls: list[str] = []
    lock = threading.Lock()

    def hook(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "call" and frame.f_code is memory.trim.__code__:
            with lock:
                calls.append(threading.current_thread().name)

    async def on_the_loop() -> str:
        sys.setprofile(hook)
        try:
            memory.after_large_buffer(memory.TRIM_AFTER_BYTES)
        finally:
            sys.setprofile(None)
        return threading.current_thread().name

    threading.setprofile(hook)  # threads started from here on
    try:
        loop_thread = asyncio.run(on_the_loop())
        for t in threading.enumerate():
            if t.name == "imgcls-heap-trim":
                t.join(10)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    assert calls == ["imgcls-heap-trim"], (calls, loop_thread)
    # off a loop (a decode thread), the caller trims itself; small buffers trim nowhere
    sys.setprofile(hook)
    try:
        memory.after_large_buffer(memory.TRIM_AFTER_BYTES)
        memory.after_large_buffer(memory.TRIM_AFTER_BYTES - 1)
    finally:
        sys.setprofile(None)
    assert calls == ["imgcls-heap-trim", threading.current_thread().name]
