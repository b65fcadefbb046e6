"""Every client mistake gets its status and a JSON detail; none gets a 500; workers survive."""

from __future__ import annotations

import os

import httpx
import pytest

from tests import images
from tests.conftest import shared_image

# The generated 3-class custom model of the session service: small, and needs no shared data.
MODEL = "tiny3"


def post(client, data: bytes, name: str = "x.png", path: str = "/classify", **params):
    return client.post(path, params=params, files={"file": (name, data)})


def assert_error(r: httpx.Response, status: int, *fragments: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, (str, list))
    for f in fragments:
        assert f in str(detail), detail


def test_empty_upload_400(client):
    assert_error(post(client, b""), 400, "empty")


def test_undecodable_upload_400(client):
    assert_error(
        post(client, b"definitely not an image", name="a.jpg"), 400, "not a readable image"
    )


def test_unreadable_shared_tiff_400(client):
    assert_error(post(client, shared_image("multipage_rgb.tif"), name="m.tif"), 400)


def test_upload_over_limit_413(client):
    assert_error(post(client, os.urandom(3 * 1024 * 1024)), 413, "limit")


def test_chunked_upload_over_limit_413(client):
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
    payload = body + os.urandom(3 * 1024 * 1024) + b"\r\n--b--\r\n"

    def gen():
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    r = client.post(
        "/classify", content=gen(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert_error(r, 413)


@pytest.mark.parametrize("bomb", ["png", "gif", "jpeg"])
def test_decompression_bomb_413(client, bomb):
    data = {"png": images.png_bomb, "gif": images.gif_bomb, "jpeg": images.jpeg_bomb}[bomb]()
    assert_error(post(client, data), 413)


def test_pixels_over_limit_413(client):
    # 20,000,000 pixels allowed by the session service: 5000 x 4001 is over
    data = images.encode(images.photo((5000, 4001)).convert("L"), "PNG")
    assert len(data) < 2 * 1024 * 1024
    assert_error(post(client, data), 413, "limit")


def test_unknown_model_404_lists_available(client):
    assert_error(post(client, b"x", model="resnet9000"), 404, "resnet9000", "resnet18", "vgg16")


@pytest.mark.parametrize("name", ["../../etc/passwd", "resnet18/../x", "..\\x", "a\x00b"])
def test_path_like_model_names_404(client, name):
    assert_error(post(client, images.encode(images.photo(), "PNG"), model=name), 404)


def test_catalog_model_not_loaded_404(client):
    r = post(client, b"x", model="vgg19")
    assert_error(r, 404, "not loaded", "IMGCLS_MODELS")
    ready = [m["name"] for m in client.get("/models").json()["models"] if m["status"] == "ready"]
    listed = r.json()["detail"].split("models ready: ")[1].split(" (")[0].split(", ")
    assert ready and sorted(listed) == sorted(ready)


@pytest.mark.parametrize("top_k", ["0", "21", "-1", "five"])
def test_bad_top_k_422(client, top_k):
    r = post(client, images.encode(images.photo(), "PNG"), top_k=top_k)
    assert r.status_code == 422, r.text


def test_missing_file_field_422(client):
    r = client.post("/classify", files={"image": ("x.png", images.encode(images.photo(), "PNG"))})
    assert_error(r, 422, "file")


def test_not_multipart_415(client):
    r = client.post("/classify", content=b"{}", headers={"Content-Type": "application/json"})
    assert_error(r, 415, "multipart/form-data")


@pytest.mark.parametrize("path", ["/classify", "/compare", "/explain"])
def test_compressed_upload_415(client, path):
    """A gzip'd form is refused by name (415), not read as a broken form (400): image files
    are compressed already, and /v2 is where compressed requests go."""
    import gzip

    data = images.encode(images.photo(), "PNG")
    boundary = "b0undary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    assert client.post(path, content=form, headers=headers).status_code == 200
    r = client.post(
        path, content=gzip.compress(form), headers={**headers, "Content-Encoding": "gzip"}
    )
    assert_error(r, 415, "Content-Encoding 'gzip'")


@pytest.mark.parametrize("length", [257, 300, 5000])
def test_overlong_multipart_boundary_400(client, length):
    boundary = "b" * length
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--{boundary}--\r\n'
    r = client.post(
        "/classify",
        content=body.encode(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_error(r, 400, "malformed multipart body")


def test_malformed_multipart_400(client):
    r = client.post(
        "/classify",
        content=b"--zz\r\ngarbage without headers end",
        headers={"Content-Type": "multipart/form-data; boundary=zz"},
    )
    assert_error(r, 400, "malformed multipart body")


@pytest.mark.parametrize("cut", ["in the data", "before the closing boundary", "in the headers"])
def test_truncated_multipart_400(client, cut):
    """A form cut off before its closing boundary is a truncated upload (400), not a form
    without a file (422): the image may look whole to a decoder that stops early."""
    data = images.encode(images.photo(), "PNG")
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
    whole = head + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--b--\r\n"
    body = {
        "in the data": whole[: len(head) + 40 + len(data) // 2],
        "before the closing boundary": whole[: -len(b"\r\n--b--\r\n")],
        "in the headers": head,
    }[cut]
    r = client.post(
        "/classify", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert_error(r, 400, "ends inside a part")


def test_non_utf8_filename_is_fine(client):
    data = images.encode(images.photo(), "PNG")
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="\xff\xfe.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--b--\r\n"
    )
    r = client.post(
        "/classify", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("models", ["resnet18", "a,b,c,d,e,f,g,h,i", "resnet18,resnet18"])
def test_compare_bad_model_lists_422(client, models):
    r = post(client, images.encode(images.photo(), "PNG"), path="/compare", models=models)
    assert r.status_code == 422, r.text


def test_compare_unknown_model_404(client):
    r = post(client, b"x", path="/compare", models="resnet18,nope")
    assert_error(r, 404, "nope")


def test_wrong_image_content_type_is_judged_by_content(client):
    data = images.encode(images.photo(), "PNG")
    r = client.post("/classify", files={"file": ("x.jpg", data, "application/pdf")})
    assert r.status_code == 200


def test_service_still_serves_after_bad_input(client, service):
    workers = service.service.pool.workers
    pids = [w.pid for w in workers]
    for data, status in (
        (b"", 400),
        (b"junk", 400),
        (images.png_bomb(), 413),
        (os.urandom(1000), 400),
    ):
        assert_error(post(client, data), status)
    r = post(client, images.encode(images.photo(), "PNG"))
    assert r.status_code == 200
    assert [w.pid for w in workers] == pids and all(w.alive for w in workers)


# name: (the one status the service answers, upload)
HOSTILE = {
    "zero-length": (400, b""),
    "random bytes": (400, os.urandom(4096)),
    "truncated png": (400, images.encode(images.photo((300, 300)), "PNG")[:3000]),
    "truncated jpeg": (400, images.encode(images.photo((300, 300)), "JPEG")[:1500]),
    "html as image": (400, b"<!doctype html><html><body>hi</body></html>"),
    "svg as image": (400, b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>"),
    "pdf as image": (400, b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"),
    "zip as image": (400, b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + os.urandom(200)),
    "png bomb": (413, images.png_bomb()),
    "gif bomb": (413, images.gif_bomb()),
    "jpeg bomb": (413, images.jpeg_bomb()),
    "1x10000 strip": (400, images.encode(images.Image.new("L", (1, 10_000)), "PNG")),
    "10000x1 strip": (400, images.encode(images.Image.new("L", (10_000, 1)), "PNG")),
    # Decode budgets (issue 16): files whose decode costs far more than their size.
    "jpeg scan bomb": (400, images.jpeg_scan_bomb(repeats=200)),
    "jpeg marker flood": (400, images.jpeg_marker_flood()),
    "png chunk flood": (400, images.png_chunk_flood()),
    "gif block flood": (400, images.gif_block_flood()),
}


def test_hostile_corpus_gets_4xx_and_no_worker_dies(client, service):
    workers = service.service.pool.workers
    pids = [w.pid for w in workers]
    for name, (status, data) in HOSTILE.items():
        r = post(client, data, name="upload.png", model=MODEL)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        assert r.json()["detail"], name
    assert [w.pid for w in workers] == pids and all(w.alive for w in workers)
    ok = post(client, images.encode(images.photo(), "PNG"), model=MODEL)
    assert ok.status_code == 200


@pytest.mark.parametrize("name", ["1x1.png", "cmyk.jpg", "exif.jpg", "grey16.png", "anim.gif"])
def test_odd_valid_uploads_over_http(client, name):
    img = images.photo()
    data = {
        "1x1.png": lambda: images.encode(images.Image.new("RGB", (1, 1)), "PNG"),
        "cmyk.jpg": lambda: images.encode(img.convert("CMYK"), "JPEG"),
        "exif.jpg": lambda: images.exif_rotated(8),
        "grey16.png": lambda: images.encode(
            images.Image.fromarray(images.np.full((20, 30), 40000, images.np.uint16)), "PNG"
        ),
        "anim.gif": lambda: images.encode(
            img, "GIF", save_all=True, append_images=[img.rotate(90)]
        ),
    }[name]()
    r = post(client, data, name=name, model=MODEL)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/classify", "/compare", "/v2", "/v2-large"])
def test_checking_and_decoding_count_against_the_request_deadline(client, service, monkeypatch,
                                                                  path):  # fmt: skip
    """An upload's check (decoding in the worker) or decode (in the API: /compare) runs on a
    thread that may be busy; the request's deadline covers it: 504 at the deadline instead of an
    answer long after it; for /v2, reading a large request's JSON (on a thread) counts too.
    Here each of those steps takes 3 s against a 0.5 s deadline."""
    import time

    from app import core, imaging
    from app.oip import codec

    probe, pixels, parse = imaging.probe, core._pixels, codec.decode_request

    def slow_probe(*args):
        time.sleep(3)
        return probe(*args)

    def slow_pixels(*args):
        time.sleep(3)
        return pixels(*args)

    def slow_parse(*args):
        time.sleep(3)
        return parse(*args)

    if path == "/v2-large":  # a small one is read on the event loop: nothing to wait for
        monkeypatch.setattr(codec, "decode_request", slow_parse)
    monkeypatch.setattr(imaging, "probe", slow_probe)
    monkeypatch.setattr(core, "_pixels", slow_pixels)
    monkeypatch.setattr(service.settings, "request_timeout_s", 0.5)
    data = images.encode(images.photo(), "PNG")
    t0 = time.monotonic()
    if path.startswith("/v2"):
        import base64

        # "/v2-large": a JSON part over codec.PARSE_INLINE_BYTES, read on a thread
        filler = {"parameters": {"note": "x" * 70_000}} if path == "/v2-large" else {}
        doc = {**filler, "inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                                     "data": [base64.b64encode(data).decode()]}]}  # fmt: skip
        r = client.post("/v2/models/resnet18/infer", json=doc)
        detail = r.json()["error"]
    else:
        r = client.post(path, files={"file": ("x.png", data)})
        detail = r.json()["detail"]
    elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert "within the request's deadline" in detail
    assert elapsed < 2.5  # answered at the deadline, not after the 3 s step


def test_a_fault_no_handler_knows_is_a_json_500_with_the_request_id(tmp_path):
    """A server fault that no handler maps (a bug) is answered 500 with the request id and a
    generic message, and logged with its traceback; the connection stays usable. Left to
    Starlette's outermost handler, the answer was written and the exception raised on to
    uvicorn, which closed the connection: clients read a reset, not the 500."""
    from app.errors import INTERNAL_MESSAGE
    from tests.conftest import log_records, run_service

    def configure(app) -> None:  # a route with a bug, in the real app and middleware
        async def boom() -> None:
            raise RuntimeError("secret internal detail")

        app.add_api_route("/boom", boom, methods=["GET"])

    with (
        run_service(
            models="cifar10_plain20",
            allow_random_weights=True,
            weights_dir=tmp_path,
            configure=configure,
        ) as svc,  # fmt: skip
        httpx.Client(base_url=svc.url, timeout=30) as c,
        log_records("imgcls") as records,
    ):
        for _ in range(2):  # twice on one keep-alive connection
            r = c.get("/boom", headers={"X-Request-ID": "req-boom"})
            assert r.status_code == 500 and r.headers["content-type"] == "application/json"
            detail = r.json()["detail"]
            assert detail.startswith(INTERNAL_MESSAGE) and "req-boom" in detail
            assert "secret" not in detail
        assert c.get("/healthz").status_code == 200
    logged = [rec for rec in records if "req-boom" in rec.getMessage()]
    assert logged and "secret internal detail" in str(logged[0].exc_info[1])
