"""Ray Serve: the same contract, catalog, preprocessing and engine, deployed on a local Ray
instance on 127.0.0.1 and checked against the single-process service for the same image."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import numpy as np
import pytest

from tests.conftest import CIFAR_WEIGHTS, free_port, needs_shared, shared_image

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -e '.[dev]')")
from ray import serve  # noqa: E402

pytestmark = needs_shared
MODELS = "cifar10_resnet20,cifar10_resnet32"
BROKEN = "cifar10_resnet44"  # deployed without its weights: its replicas fail to start
KEY = "ray-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory):
    from app.ray_app import build_app

    weights = tmp_path_factory.mktemp("ray-weights")
    for f in ("resnet20-12fca82f.th", "resnet32-d509ac18.th"):
        (weights / f).symlink_to(CIFAR_WEIGHTS / f)
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({
            "models": f"{MODELS},{BROKEN}", "weights_dir": str(weights), "auto_download": "false",
            "api_key": KEY, "body_timeout_s": "2", "max_upload_mb": "2",
            "device": "cpu", "precision": "fp32", "compile": "false", "max_batch_wait_ms": "2",
            "explain_concurrency": "4",  # explanations of one model reach its replica together
        })  # fmt: skip
        try:
            serve.run(app, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # the application is DEPLOY_FAILED: BROKEN's replicas
            if "['backbone-cifar10_resnet44']" not in str(exc):
                raise
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            import time

            time.sleep(0.2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _both(ray_url, client, path: str, params: dict[str, object], data: bytes):
    """The same upload to the service and to the Ray deployment: (ours, theirs) bodies."""
    ours = client.post(path, params=params, files={"file": ("c.png", data)}).json()
    r = httpx.post(f"{ray_url}{path}", params=params, files={"file": ("c.png", data)},
                   timeout=120, headers=AUTH)  # fmt: skip
    assert r.status_code == 200, r.text
    return ours, r.json()


def test_ray_classify_matches_the_service(ray_url, client):
    data = shared_image("chelsea.png")
    for model in MODELS.split(","):
        ours, theirs = _both(ray_url, client, "/classify", {"model": model, "top_k": 10}, data)
        assert theirs["model"] == model and theirs["weights"] == ours["weights"]
        assert [p["index"] for p in theirs["predictions"]] == [
            p["index"] for p in ours["predictions"]
        ]
        for a, b in zip(theirs["predictions"], ours["predictions"], strict=True):
            assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert set(theirs["latency_ms"]) == set(ours["latency_ms"])


def test_ray_compare_matches_the_service(ray_url, client):
    data = shared_image("coffee.png")
    ours, theirs = _both(ray_url, client, "/compare", {"models": MODELS, "top_k": 5}, data)
    assert theirs["agreement"]["top1_consensus"] == ours["agreement"]["top1_consensus"]
    (a,), (b,) = theirs["agreement"]["pairwise"], ours["agreement"]["pairwise"]
    assert a["top1_same"] == b["top1_same"] and a["topk_overlap"] == b["topk_overlap"]
    assert a["js_divergence"] == pytest.approx(b["js_divergence"], abs=1e-4)


def test_ray_explain_matches_the_service(ray_url, client):
    data = shared_image("chelsea.png")
    model = MODELS.split(",")[1]
    params = {"model": model, "target": "3"}
    ours, theirs = _both(ray_url, client, "/explain", params, data)
    assert theirs["target"]["index"] == ours["target"]["index"] == 3
    assert theirs["target"]["score"] == pytest.approx(ours["target"]["score"], abs=1e-4)
    a, b = np.array(theirs["heatmap"]["values"]), np.array(ours["heatmap"]["values"])
    assert a.shape == b.shape == (32, 32) and a.max() > 0.5
    assert np.abs(a - b).max() <= 2e-3  # the same fp32 Grad-CAM, rounded to 3 decimals
    assert theirs["overlay"].startswith("data:image/png;base64,")
    assert set(theirs["latency_ms"]) == set(ours["latency_ms"])
    assert 0 <= theirs["latency_ms"]["queue"] <= theirs["latency_ms"]["total"]

    ours, theirs = _both(
        ray_url, client, "/compare", {"models": MODELS, "explain": "gradcam"}, data
    )
    (sim,) = theirs["agreement"]["heatmap_similarity"]
    assert sim["pearson"] == pytest.approx(ours["agreement"]["heatmap_similarity"][0]["pearson"],
                                           abs=1e-3)  # fmt: skip
    for r in theirs["results"]:
        assert r["explanation"]["target"]["index"] == r["predictions"][0]["index"]

    # several at once on one replica: one job at a time on its single fp32 copy (Captum's
    # hooks on one module from two threads broke each other: 500s)
    def one(_: int) -> int:
        return httpx.post(f"{ray_url}/explain", params={"model": model}, timeout=120, headers=AUTH,
                          files={"file": ("c.png", data)}).status_code  # fmt: skip

    with cf.ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(16))) == [200] * 16

    r = httpx.post(f"{ray_url}/explain", params={"model": model, "target": "10"}, headers=AUTH,
                   files={"file": ("c.png", data)})  # fmt: skip
    assert r.status_code == 422 and "class" in r.json()["detail"], r.text


def test_ray_answers_carry_one_request_id_the_bodies_name(ray_url):
    """Ray's proxy echoes X-Request-ID itself: the ingress adds none of its own (clients read
    two headers as "id, id"), and the id in the body is the one in the header, the client's or
    the proxy's."""
    data = shared_image("chelsea.png")
    for sent in ({"X-Request-ID": "ray-rid-1"}, {}):
        r = httpx.post(f"{ray_url}/classify", params={"model": "cifar10_resnet20"},
                       files={"file": ("c.png", data)}, headers={**AUTH, **sent}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        (rid,) = r.headers.get_list("x-request-id")
        assert r.json()["request_id"] == rid == sent.get("X-Request-ID", rid)
    r = httpx.post(f"{ray_url}/classify", params={"model": "nope"}, files={"file": ("x", b"x")},
                   headers={**AUTH, "X-Request-ID": "ray-rid-2"})  # fmt: skip
    assert r.status_code == 404 and r.headers.get_list("x-request-id") == ["ray-rid-2"]


def test_ray_errors_and_models(ray_url):
    r = httpx.post(f"{ray_url}/classify", params={"model": "nope"}, files={"file": ("x", b"x")},
                   headers=AUTH)  # fmt: skip
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = httpx.post(f"{ray_url}/classify", params={"model": "cifar10_resnet20"},
                   files={"file": ("x", b"junk")}, headers=AUTH)  # fmt: skip
    assert r.status_code == 400
    models = {m["name"]: m for m in httpx.get(f"{ray_url}/models", headers=AUTH).json()["models"]}
    assert (
        models["cifar10_resnet20"]["status"] == "ready"
        and models["resnet50"]["status"] == "not-loaded"
    )
    # IMGCLS_MAX_BATCH_SIZE=auto (the default): each replica timed batch sizes at load, as the
    # service's workers do, and its batches close at the size it picked
    for name in MODELS.split(","):
        assert models[name]["batch_size"] in (1, 2, 4, 8, 16, 32), models[name]
    r = httpx.head(f"{ray_url}/healthz")  # HEAD, as on the service, for probes that check with it
    assert r.status_code == 200 and not r.content


def test_ray_keeps_the_services_guards(ray_url):
    """The ingress checks IMGCLS_API_KEY and the body limits as the service does (it served
    anyone, and 256 stalled uploads took every request slot of the deployment)."""
    import socket
    import time
    from urllib.parse import urlsplit

    r = httpx.post(f"{ray_url}/classify", files={"file": ("c.png", shared_image("chelsea.png"))})
    assert r.status_code == 401 and "API key" in r.json()["detail"], r.text
    assert httpx.get(f"{ray_url}/models").status_code == 401
    assert httpx.get(f"{ray_url}/healthz").status_code == 200  # probes need no key
    r = httpx.post(f"{ray_url}/classify", headers=AUTH,
                   files={"file": ("big.png", b"\0" * (3 * 2**20))})  # fmt: skip
    assert r.status_code == 413, r.text  # IMGCLS_MAX_UPLOAD_MB=2
    url = urlsplit(ray_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as conn:
        conn.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )  # and then nothing: IMGCLS_BODY_TIMEOUT_S=2
        t0 = time.monotonic()
        head = conn.recv(4096).decode("latin-1")
    assert head.split(" ")[1] == "408", head
    assert time.monotonic() - t0 < 20
    r = httpx.head(f"{ray_url}/models", headers=AUTH)
    assert r.status_code == 200 and not r.content
    one = httpx.get(f"{ray_url}/models/cifar10_resnet20", headers=AUTH).json()
    assert one["status"] == "ready" and len(one["labels"]) == 10


def test_ray_a_backbone_that_fails_holds_up_no_other(ray_url):
    """cifar10_resnet44 has no weights: its replicas fail to start. /readyz says so (503), the
    other backbones serve, and it answers 503 with the reason (every request used to wait on
    every backbone's first answer: 503 after the deadline for all, in plain text)."""
    ready = httpx.get(f"{ray_url}/readyz")
    assert ready.status_code == 503 and ready.headers["Retry-After"]
    assert [n.split(":")[0] for n in ready.json()["not_ready"]] == [BROKEN]
    data = shared_image("chelsea.png")
    r = httpx.post(f"{ray_url}/classify", params={"model": "cifar10_resnet20"}, headers=AUTH,
                   files={"file": ("c.png", data)}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    models = {m["name"]: m for m in httpx.get(f"{ray_url}/models", headers=AUTH).json()["models"]}
    assert models[BROKEN]["status"] in ("loading", "failed") and models[BROKEN]["reason"]
    r = httpx.post(f"{ray_url}/classify", params={"model": BROKEN}, headers=AUTH,
                   files={"file": ("c.png", data)}, timeout=120)  # fmt: skip
    assert r.status_code == 503 and BROKEN in r.json()["detail"], r.text
    assert r.headers["Retry-After"]


@pytest.mark.browser
def test_ray_serves_the_page_and_info(ray_url, browser):
    """The page and /info on Ray's ingress, as on the service: the page open without the key
    (it asks for the key when /info or /models is refused), /info behind it, with the ingress's
    limits and the replicas' device and CPU features; in Chromium the page lists the deployed
    backbones (the one that failed disabled) and classifies with the key it was given."""
    from app.engine import fastpath
    from app.schemas import Info
    from tests.conftest import IMAGES

    home = httpx.get(f"{ray_url}/")
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{ray_url}/static/app.js").status_code == 200
    assert httpx.get(f"{ray_url}/info").status_code == 401
    info = Info.model_validate(httpx.get(f"{ray_url}/info", headers=AUTH, timeout=30).json())
    assert info.models == [*MODELS.split(","), BROKEN] and info.default_model == "cifar10_resnet20"
    assert info.max_upload_mb == 2 and info.devices == ["cpu"]
    assert info.cpu_features == fastpath.cpu_features().names()  # the replicas run here too

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = context.new_page()
        page.goto(f"{ray_url}/")
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector("#model-groups[aria-busy=false]")
        assert page.is_enabled("input[name=models][value='cifar10_resnet20']")
        assert page.is_disabled(f"input[name=models][value='{BROKEN}']")
        for box in page.query_selector_all("input[name=models]:checked"):
            box.uncheck()
        page.check("input[name=models][value='cifar10_resnet20']")
        page.set_input_files("#file-input", str(IMAGES / "chelsea.png"))
        page.click("#classify-btn")
        card = page.wait_for_selector(".card[data-model='cifar10_resnet20']")
        api = httpx.post(f"{ray_url}/classify", params={"model": "cifar10_resnet20"},
                         files={"file": ("c.png", shared_image("chelsea.png"))}, headers=AUTH,
                         timeout=120).json()  # fmt: skip
        top1 = card.query_selector("li.pred .pred-label").get_attribute("title")
        assert top1 == api["predictions"][0]["label"]
        assert page.is_hidden("#error")
    finally:
        context.close()
