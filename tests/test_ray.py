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
            "models": MODELS, "weights_dir": str(weights), "auto_download": "false",
            "device": "cpu", "precision": "fp32", "compile": "false", "max_batch_wait_ms": "2",
            "explain_concurrency": "4",  # explanations of one model reach its replica together
        })  # fmt: skip
        serve.run(app, route_prefix="/", blocking=False)
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
    r = httpx.post(f"{ray_url}{path}", params=params, files={"file": ("c.png", data)}, timeout=120)
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
        return httpx.post(f"{ray_url}/explain", params={"model": model}, timeout=120,
                          files={"file": ("c.png", data)}).status_code  # fmt: skip

    with cf.ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(16))) == [200] * 16

    r = httpx.post(f"{ray_url}/explain", params={"model": model, "target": "10"},
                   files={"file": ("c.png", data)})  # fmt: skip
    assert r.status_code == 422 and "class" in r.json()["detail"], r.text


def test_ray_errors_and_models(ray_url):
    r = httpx.post(f"{ray_url}/classify", params={"model": "nope"}, files={"file": ("x", b"x")})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = httpx.post(
        f"{ray_url}/classify", params={"model": "cifar10_resnet20"}, files={"file": ("x", b"junk")}
    )
    assert r.status_code == 400
    models = {m["name"]: m for m in httpx.get(f"{ray_url}/models").json()["models"]}
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
