"""/classify and /models through real HTTP with real models."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights, get_model_builder

from tests import images
from tests.conftest import CIFAR_WEIGHTS, IMAGES, needs_shared, shared_image

# A generated photo-like image: the tests of the API's plumbing need no shared data.
PNG = images.encode(images.photo((320, 240)), "PNG")


def classify(client, data: bytes, name: str = "x.png", **params):
    return client.post("/classify", params=params, files={"file": (name, data)})


def test_classify_response_shape(client):
    r = classify(client, PNG, model="resnet18", top_k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "resnet18"
    assert body["device"] == "cpu"
    assert body["precision"] == "fp32" and body["backend"] == "eager"
    assert [p["rank"] for p in body["predictions"]] == [1, 2, 3, 4, 5]
    scores = [p["score"] for p in body["predictions"]]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    labels = ResNet18_Weights.DEFAULT.meta["categories"]
    assert all(labels[p["index"]] == p["label"] for p in body["predictions"])
    assert set(body["latency_ms"]) == {"decode", "preprocess", "queue", "inference", "total"}
    assert body["latency_ms"]["total"] >= body["latency_ms"]["inference"] > 0
    assert body["batch_size"] >= 1
    assert r.headers["X-Request-ID"] == body["request_id"]


def test_default_model_is_first_configured(client):
    r = classify(client, PNG)
    assert r.status_code == 200
    assert r.json()["model"] == "resnet18"


def test_a_model_name_is_read_as_compare_reads_its_names(client):
    """Spaces around the name are not part of it (as in /compare's list); an empty or blank
    name is the default model."""
    assert classify(client, PNG, model=" alexnet ").json()["model"] == "alexnet"
    assert classify(client, PNG, model="  ").json()["model"] == "resnet18"
    r = client.post("/explain", params={"model": " alexnet"}, files={"file": ("c.png", PNG)})
    assert r.status_code == 200 and r.json()["model"] == "alexnet", r.text


def test_request_id_is_honoured(client):
    r = client.post(
        "/classify",
        files={"file": ("c.png", PNG)},
        headers={"X-Request-ID": "trace-42"},
    )
    assert r.headers["X-Request-ID"] == "trace-42"
    assert r.json()["request_id"] == "trace-42"


def test_random_weights_are_labelled(client):
    r = classify(client, PNG, model="alexnet")
    assert r.status_code == 200
    assert r.json()["weights"] == "random"
    entry = next(m for m in client.get("/models").json()["models"] if m["name"] == "alexnet")
    assert entry["weights"] == "random"


@needs_shared(CIFAR_WEIGHTS)
def test_real_weights_are_named(client):
    body = classify(client, shared_image("chelsea.png"), model="cifar10_resnet56").json()
    assert body["weights"] == "resnet56-4bfd9763.th"
    assert body["predictions"][0]["label"] == "cat"  # a real photo of a cat, real weights


def test_top_k_is_capped_at_class_count(client):
    r = classify(client, PNG, model="tiny3", top_k=20)  # the generated 3-class custom model
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert len(preds) == 3
    assert abs(sum(p["score"] for p in preds) - 1.0) < 1e-4


def test_models_lists_whole_catalog_with_status(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    expected = {
        "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
        "vgg19_bn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    }  # fmt: skip
    assert expected <= set(models)
    r50 = models["resnet50"]
    assert r50["status"] == "not-loaded" and r50["reason"]
    assert r50["family"] == "resnet" and r50["depth"] == 50
    assert r50["params"] == 25_557_032 and r50["gflops"] == pytest.approx(4.089)
    assert r50["acc1"] == pytest.approx(80.858) and r50["acc5"] == pytest.approx(95.434)
    assert r50["weights_file"] == "resnet50-11ad3fa6.pth" and r50["input_size"] == 224
    assert models["vgg16"]["family"] == "cnn" and models["vgg16"]["depth"] == 16
    assert models["alexnet"]["depth"] == 8
    assert models["resnet18"]["status"] == "ready" and models["resnet18"]["device"] == "cpu"
    assert models["tiny3"]["source"] == "custom" and models["tiny3"]["num_classes"] == 3


def test_model_detail_has_labels(client):
    r = client.get("/models/cifar10_resnet20")
    assert r.status_code == 200
    assert r.json()["labels"][:3] == ["airplane", "automobile", "bird"]
    assert client.get("/models/nope").status_code == 404


def test_weights_variant_resolves_in_catalog():
    from app.catalog import build_catalog

    spec = build_catalog().get("resnet50:IMAGENET1K_V1")
    assert spec.weights_file == "resnet50-0676ba61.pth"
    assert spec.acc1 == pytest.approx(76.13)


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    for path in ("/healthz", "/readyz"):  # HEAD, as some probes and load balancers check
        r = client.head(path)
        assert r.status_code == 200 and not r.content, path


def test_head_wherever_get(client):
    """HEAD is answered on every GET route (RFC 9110) with GET's status and headers and no
    body; on a POST-only route it is 405, as GET is."""
    name = client.get("/models").json()["models"][0]["name"]
    for path in ("/", "/static/app.js", "/info", "/models", f"/models/{name}", "/metrics",
                 "/v2", f"/v2/models/{name}", f"/v2/models/{name}/ready", "/v2/health/live",
                 "/v2/health/ready", "/v2/models/stats", "/models/nope"):  # fmt: skip
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code, path
        assert not head.content, path
        assert head.headers["content-type"] == got.headers["content-type"], path
        if path != "/metrics":  # counters move between the two
            assert int(head.headers["content-length"]) == len(got.content), path
    assert client.head("/classify").status_code == client.get("/classify").status_code == 405

    def ready_count() -> float:  # HEAD is counted under its route, as GET is
        line = f'imgcls_requests_total{{endpoint="/v2/models/{{name}}/ready",model="{name}",'
        found = [x for x in client.get("/metrics").text.splitlines() if x.startswith(line)]
        return sum(float(x.rsplit(" ", 1)[1]) for x in found)

    before = ready_count()
    client.head(f"/v2/models/{name}/ready")
    assert ready_count() == before + 1


def _local_probs(model: torch.nn.Module, transform, img: Image.Image) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(transform(img).unsqueeze(0)), 1)[0].numpy()


@needs_shared(IMAGES)
@pytest.mark.parametrize("image", ["chelsea.png", "rocket.jpg", "camera.png"])
def test_preprocessing_parity_with_torchvision(client, model_dir, image):
    """The service's top-k equals torchvision's weights.transforms() + the same checkpoint."""
    model = get_model_builder("resnet18")(weights=None).eval()
    model.load_state_dict(torch.load(model_dir / "resnet18-f37072fd.pth", weights_only=True))
    img = Image.open(IMAGES / image).convert("RGB")
    expected = _local_probs(model, ResNet18_Weights.DEFAULT.transforms(), img)
    body = classify(client, shared_image(image), model="resnet18", top_k=5).json()
    for p in body["predictions"]:
        assert p["score"] == pytest.approx(float(expected[p["index"]]), abs=1e-3)
    top = np.argsort(-expected)[:5]
    assert [p["index"] for p in body["predictions"]][:3] == top[:3].tolist()


@needs_shared(CIFAR_WEIGHTS, IMAGES)
def test_batch_invariance_under_concurrency(service, client):
    """Alone or batched, the same image gets the same probabilities (1e-4)."""
    names = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "horse.png", "camera.png"]
    data = {n: shared_image(n) for n in names}
    alone = {}
    for n in names:
        body = classify(client, data[n], name=n, model="cifar10_resnet32", top_k=10).json()
        assert body["batch_size"] == 1
        alone[n] = {p["index"]: p["score"] for p in body["predictions"]}

    jobs = [names[i % len(names)] for i in range(48)]

    def send(n: str):
        import httpx

        with httpx.Client(base_url=service.url, timeout=120) as c:
            return n, classify(c, data[n], name=n, model="cifar10_resnet32", top_k=10).json()

    with cf.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(send, jobs))
    sizes = [body["batch_size"] for _, body in results]
    assert max(sizes) > 1, f"no batching observed: {sizes}"
    for n, body in results:
        for p in body["predictions"]:
            assert abs(p["score"] - alone[n][p["index"]]) <= 1e-4


@needs_shared(CIFAR_WEIGHTS, IMAGES)
@pytest.mark.parametrize(
    "name",
    ["camera.png", "horse.png", "no_time_for_that_tiny.gif", "hubble_deep_field.jpg"],
)
def test_odd_but_valid_shared_images(client, name):
    """Grayscale, RGBA, animated palette GIF, EXIF-tagged JPEG: all classified."""
    r = classify(client, shared_image(name), name=name, model="cifar10_resnet20")
    assert r.status_code == 200, r.text


def test_metrics_are_exported(service, client):
    before = client.get("/metrics").text
    assert (
        client.post(
            "/classify", params={"model": "tiny3"}, files={"file": ("c.png", PNG)}
        ).status_code
        == 200
    )
    text = client.get("/metrics").text
    for name in (
        "imgcls_requests_total", "imgcls_request_latency_seconds_bucket",
        "imgcls_queue_latency_seconds_bucket", "imgcls_inference_latency_seconds_bucket",
        "imgcls_batch_size_bucket", "imgcls_queue_depth", "imgcls_models", "imgcls_device_memory_bytes",
        "imgcls_workers_alive",
    ):  # fmt: skip
        assert name in text, name
    served = len(service.settings.models.split(","))  # 8 with the shared data, 4 without
    assert f'imgcls_models{{status="ready"}} {served}.0' in text
    line = 'imgcls_requests_total{endpoint="/classify",model="tiny3",status="200"}'

    def count(t: str) -> float:
        return sum(float(x.split()[-1]) for x in t.splitlines() if x.startswith(line))

    assert count(text) == count(before) + 1
    # a repeated ?model= is counted under the model that answered: the last, as the route reads
    r = client.post("/classify", params=[("model", "r18_copy"), ("model", "tiny3")],
                    files={"file": ("c.png", PNG)})  # fmt: skip
    assert r.status_code == 200 and r.json()["model"] == "tiny3"
    text = client.get("/metrics").text
    assert count(text) == count(before) + 2
    # a name with spaces around it, and none, are counted under the model that answered
    r = client.post("/classify", params={"model": " tiny3 "}, files={"file": ("c.png", PNG)})
    assert r.status_code == 200 and count(client.get("/metrics").text) == count(before) + 3
    default = service.settings.default
    for path in ("/classify", "/explain"):
        row = f'imgcls_requests_total{{endpoint="{path}",model="{default}",status="200"}}'

        def served(t: str, row: str = row) -> float:
            return sum(float(x.split()[-1]) for x in t.splitlines() if x.startswith(row))

        was = served(client.get("/metrics").text)
        for params in ({}, {"model": " "}):
            r = client.post(path, params=params, files={"file": ("c.png", PNG)})
            assert r.status_code == 200 and r.json()["model"] == default, r.text
        assert served(client.get("/metrics").text) == was + 2, path
    text = client.get("/metrics").text
    # /models/{name} is counted under the model in its path, not a ?model= it does not take
    client.get("/models/tiny3", params={"model": "cifar10_resnet20"})
    client.get("/models/nosuch", params={"model": "tiny3"})
    after = client.get("/metrics").text

    def labelled(t: str, model: str, status: str) -> float:
        row = f'imgcls_requests_total{{endpoint="/models/{{name}}",model="{model}",status="{status}"}}'
        return sum(float(x.split()[-1]) for x in t.splitlines() if x.startswith(row))

    assert labelled(after, "tiny3", "200") == labelled(text, "tiny3", "200") + 1
    assert labelled(after, "unknown", "404") == labelled(text, "unknown", "404") + 1
    assert labelled(after, "tiny3", "404") == labelled(text, "tiny3", "404")
    memory = [
        x for x in text.splitlines() if x.startswith('imgcls_device_memory_bytes{device="cpu"}')
    ]
    assert memory and float(memory[0].split()[-1]) > 10e6  # the worker's resident memory
