"""POST /explain and /compare?explain=gradcam over real HTTP, with the real CIFAR-10 ResNets.

The session service (tests/conftest.py) serves the pretrained CIFAR-10 ResNet-20/56 beside small
torchvision models; the queue test starts its own service with a tight explain queue. The
deletion test of tests/test_explain.py is repeated here over HTTP on 40 CIFAR-10 test images: the
maps come from /explain, the scores from /classify.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
import io
import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests import images
from tests.conftest import CIFAR_SAMPLE, needs_shared, run_service, shared_image

pytestmark = needs_shared

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # greyed pixels normalise to ~0


def _explain(client: httpx.Client, data: bytes, **params: object) -> httpx.Response:
    return client.post("/explain", params=params, files={"file": ("img", data)})


def _png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_explain_answers_a_heatmap_at_the_input_size_and_an_overlay(client) -> None:
    r = _explain(client, shared_image("chelsea.png"), model="cifar10_resnet56")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "cifar10_resnet56" and body["method"] == "gradcam"
    assert body["target"]["label"] == "cat"  # the pretrained net's answer for Chelsea the cat
    assert 0.0 < body["target"]["score"] <= 1.0
    heat = np.array(body["heatmap"]["values"])
    assert body["heatmap"]["height"] == body["heatmap"]["width"] == 32
    assert heat.shape == (32, 32)
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() == 1.0
    assert np.array_equal(heat, np.round(heat, 3))  # 3 decimals in the JSON, as documented
    assert _png(body["overlay"]).size == (32, 32)
    lat = body["latency_ms"]
    assert set(lat) == {"decode", "preprocess", "queue", "explain", "total"}
    assert lat["explain"] > 0 and lat["total"] >= lat["explain"]
    assert body["request_id"] == r.headers["x-request-id"]
    metrics = client.get("/metrics").text  # counted as explanations, not "other"
    assert 'imgcls_requests_total{endpoint="/explain",model="cifar10_resnet56",status="200"}' in (
        metrics
    )


def test_explain_at_224_px_and_without_heatmap_values(client) -> None:
    r = _explain(client, shared_image("coffee.png"), model="resnet18", heatmap="false")
    assert r.status_code == 200, r.text
    body = r.json()
    assert "heatmap" not in body
    assert _png(body["overlay"]).size == (224, 224)


def test_target_index_is_honoured(client) -> None:
    data = shared_image("chelsea.png")
    maps = {}
    for target in (3, 5):  # cat, dog
        r = _explain(client, data, model="cifar10_resnet56", target=target)
        assert r.status_code == 200, r.text
        assert r.json()["target"]["index"] == target
        assert r.json()["target"]["label"] == ["cat", "dog"][target == 5]
        maps[target] = np.array(r.json()["heatmap"]["values"])
    assert not np.array_equal(maps[3], maps[5])


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"model": "cifar10_resnet56", "method": "lime"}, 422, "unknown explanation method"),
        ({"model": "cifar10_resnet56", "target": 10}, 422, "not a class"),
        ({"model": "cifar10_resnet56", "target": "cat"}, 422, "top1 or a class index"),
        ({"model": "cifar10_resnet56", "target": -1}, 422, "not a class"),
        ({"model": "cifar10_resnet56", "target": " 3 "}, 422, "top1 or a class index"),
        ({"model": "cifar10_resnet56", "target": "+3"}, 422, "top1 or a class index"),
        ({"model": "cifar10_resnet56", "target": "1_0"}, 422, "top1 or a class index"),
        ({"model": "cifar10_resnet56", "target": "\u0663"}, 422, "top1 or a class index"),
        ({"model": "no_such_net"}, 404, "no_such_net"),
    ],
)
def test_client_mistakes_are_4xx(client, params, status, words) -> None:
    r = _explain(client, shared_image("chelsea.png"), **params)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_undecodable_upload_is_400(client) -> None:
    r = _explain(client, b"not an image at all", model="cifar10_resnet56")
    assert r.status_code == 400, r.text


def test_compare_with_explanations_and_map_similarity(client) -> None:
    models = "cifar10_resnet20,cifar10_resnet56,resnet18"
    r = client.post(
        "/compare",
        params={"models": models, "explain": "gradcam"},
        files={"file": ("c.png", shared_image("chelsea.png"))},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    for res in body["results"]:
        exp = res["explanation"]
        assert exp["model"] == res["model"] and exp["method"] == "gradcam"
        assert exp["target"]["index"] == res["predictions"][0]["index"]  # its own top-1
        size = 224 if res["model"] == "resnet18" else 32
        assert _png(exp["overlay"]).size == (size, size)
    sims = body["agreement"]["heatmap_similarity"]
    # only the two CIFAR nets share a geometry (32 px squash); resnet18 sees a 224 px crop
    assert [(s["a"], s["b"]) for s in sims] == [("cifar10_resnet20", "cifar10_resnet56")]
    assert -1.0 <= sims[0]["pearson"] <= 1.0
    plain = client.post(
        "/compare",
        params={"models": models},
        files={"file": ("c.png", shared_image("chelsea.png"))},
    ).json()
    assert plain["results"][0]["explanation"] is None
    assert plain["agreement"]["heatmap_similarity"] is None


def test_compare_with_unknown_method_is_422(client) -> None:
    r = client.post(
        "/compare",
        params={"models": "cifar10_resnet20,cifar10_resnet56", "explain": "lime"},
        files={"file": ("c.png", shared_image("chelsea.png"))},
    )
    assert r.status_code == 422 and "unknown explanation method" in r.json()["detail"]


def test_explanations_of_more_models_than_the_gate_holds_are_422_not_503() -> None:
    """A /compare?explain=gradcam of more models than IMGCLS_EXPLAIN_CONCURRENCY +
    IMGCLS_EXPLAIN_QUEUE can never be admitted: retrying (503) would never help."""
    from app.core import ExplainGate
    from app.errors import ExplainQueueFullError, InvalidParameterError

    gate = ExplainGate(concurrency=1, queue=1)
    gate.check(2)  # fits
    with pytest.raises(InvalidParameterError, match="IMGCLS_EXPLAIN_QUEUE >= 3"):
        gate.check(3)
    gate.count = 1  # one running: two more do not fit now, but will
    with pytest.raises(ExplainQueueFullError):
        gate.check(2)


def test_openapi_documents_explain(client) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/explain"]["post"]
    assert {p["name"] for p in op["parameters"]} >= {"model", "method", "target", "heatmap"}
    assert {"422", "404", "503"} <= set(op["responses"])
    assert "explain" in {p["name"] for p in spec["paths"]["/compare"]["post"]["parameters"]}


# ---- the explain queue ----------------------------------------------------------------------


def test_an_explanation_past_its_deadline_keeps_its_place_until_it_ends() -> None:
    """Its client gets 504 at the deadline, but the explanation runs on in its worker: its place
    among IMGCLS_EXPLAIN_CONCURRENCY stays taken until it ends, so the next explanation is
    refused (503) instead of joining it on the workers; once it ends, explanations are admitted
    again. vgg16 (random weights) takes 0.25 s or more per Grad-CAM on a 2-core CPU, against a
    deadline of 0.1 s (a small photo: its decode takes a fraction of it)."""
    photo = images.encode(images.photo(), "PNG")
    with run_service(
        models="vgg16", allow_random_weights=True, explain_concurrency=1, explain_queue=0,
        request_timeout_s=0.1,
    ) as svc, httpx.Client(base_url=svc.url, timeout=60) as c:  # fmt: skip

        def explain() -> httpx.Response:
            return c.post("/explain", params={"model": "vgg16"}, files={"file": ("a", photo)})

        first = explain()
        assert first.status_code == 504, first.text
        assert "no explanation from vgg16" in first.json()["detail"]  # sent to its worker
        second = explain()  # at once: the first still runs
        assert second.status_code == 503, second.text
        assert "IMGCLS_EXPLAIN_QUEUE" in second.json()["detail"]
        deadline = time.monotonic() + 60
        while (r := explain()).status_code == 503:  # admitted once the first has ended
            assert time.monotonic() < deadline, "the place was never given back"
            time.sleep(0.5)
        assert r.status_code == 504, r.text  # admitted, sent, and it too outlives its deadline
        assert "no explanation from vgg16" in r.json()["detail"]


def test_the_explain_queue_counts_requests_from_their_decode_not_their_upload() -> None:
    """The explain queue is checked before a request's body is read, and a request takes its
    place once its body is in, before its upload is decoded. So: uploads still arriving (slow
    clients) hold no place, and explanations are served meanwhile; requests whose uploads
    are being decoded hold theirs, so a burst is refused at once, before its images are
    decoded (the gate counted only explanations past their decode: every request of a burst
    was admitted, read and decoded, then refused). A request refused later (a broken upload)
    gives its place back, and a /compare with explain is not refused for its own places."""
    import concurrent.futures as cf
    import threading

    from tests.rawhttp import connect, multipart

    models = "cifar10_plain20,cifar10_resnet20"
    model = models.split(",")[0]
    png = images.encode(images.photo(), "PNG")
    body = multipart(png)
    head = (
        f"POST /explain?model={model} HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; "
        f"boundary=imgclsboundary\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with run_service(
        models=models, allow_random_weights=True, explain_concurrency=1, explain_queue=1,
        body_timeout_s=30,
    ) as svc, httpx.Client(base_url=svc.url, timeout=60) as c:  # fmt: skip
        gate, service = svc.service.explain_gate, svc.service

        def explain(data: bytes = png) -> httpx.Response:
            return c.post("/explain", params={"model": model}, files={"file": ("a", data)})

        # two uploads arriving slowly: no place taken, another explanation is served
        slow = [connect(svc.url, timeout=60) for _ in range(2)]
        for sock in slow:
            sock.sendall(head + body[:100])
        time.sleep(0.5)
        assert gate.count == 0
        assert explain().status_code == 200
        for sock in slow:
            sock.close()

        # two uploads in and decoding (held here): the queue is full, a third is refused
        release = threading.Event()
        decode = service.decode

        async def held_decode(*args, **kwargs):
            await asyncio.to_thread(release.wait, 30)
            return await decode(*args, **kwargs)

        service.decode = held_decode
        try:
            with cf.ThreadPoolExecutor(2) as ex:
                running = [ex.submit(explain) for _ in range(2)]
                deadline = time.monotonic() + 10
                while gate.count < 2:
                    assert time.monotonic() < deadline, f"places taken: {gate.count} of 2"
                    time.sleep(0.02)
                third = explain()
                assert third.status_code == 503 and "IMGCLS_EXPLAIN_QUEUE" in third.text
                both = c.post("/compare", params={"models": models, "explain": "gradcam"},
                              files={"file": ("a", png)})  # fmt: skip
                assert both.status_code == 503 and "IMGCLS_EXPLAIN_QUEUE" in both.text
                release.set()
                assert [r.result(timeout=60).status_code for r in running] == [200, 200]
        finally:
            release.set()
            del service.decode  # the class's again
        assert gate.count == 0
        broken = explain(b"junk")
        assert broken.status_code == 400 and gate.count == 0, broken.text
        both = c.post("/compare", params={"models": models, "explain": "gradcam"},
                      files={"file": ("a", png)})  # fmt: skip
        assert both.status_code == 200, both.text
        assert all(r["explanation"] for r in both.json()["results"]) and gate.count == 0


def test_full_explain_queue_is_503_while_classification_answers() -> None:
    """One explanation at a time and one waiting; a burst of 8 explanations of a ResNet-50
    (random weights: the maps do not matter here, the seconds they take on a CPU do) overflows
    it, while /classify keeps answering 200 from the other worker."""
    photo = shared_image("astronaut.png")
    small = shared_image("chelsea.png")
    with run_service(
        models="resnet50",
        allow_random_weights=True,
        workers_per_device=2,
        threads_per_worker=1,
        explain_concurrency=1,
        explain_queue=1,
    ) as svc:

        async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
            async with httpx.AsyncClient(base_url=svc.url, timeout=120) as c:
                explains = [
                    c.post("/explain", params={"model": "resnet50"}, files={"file": ("a", photo)})
                    for _ in range(8)
                ]

                async def classify_a_few() -> list[httpx.Response]:
                    out = []
                    for _ in range(3):
                        out.append(
                            await c.post(
                                "/classify",
                                params={"model": "resnet50"},
                                files={"file": ("c", small)},
                            )
                        )
                    return out

                *ex, cl = await asyncio.gather(*explains, classify_a_few())
                return list(ex), cl

        explained, classified = asyncio.run(burst())
    codes = sorted(r.status_code for r in explained)
    assert set(codes) == {200, 503}, codes
    assert codes.count(200) >= 2  # the running one and the waiting one
    for r in explained:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert "IMGCLS_EXPLAIN_QUEUE" in r.json()["detail"]
    assert [r.status_code for r in classified] == [200, 200, 200]


# ---- deletion test over HTTP ----------------------------------------------------------------

SIDE = round(math.sqrt(0.2 * 32 * 32))  # 14 x 14 = 196 px, 19.1% of the image
PER_CLASS = 20  # 200 images, as in process: the same test, through the API


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_deletion_over_http_agrees_with_the_in_process_numbers(client) -> None:
    """Greying out the pixels /explain ranks highest hurts the model's top-1 score far more than
    greying out those it ranks lowest or a random square of the same area (in process, on the same
    200 images: 0.608 vs 0.102 vs 0.399; measured here: 0.607 vs 0.104 vs 0.389)."""
    files = [p for c in sorted(CIFAR_SAMPLE.iterdir()) for p in sorted(c.glob("*.jpg"))[:PER_CLASS]]
    assert len(files) == 10 * PER_CLASS
    rng = np.random.default_rng(0)
    mean = np.array(MEAN_RGB).round().astype(np.uint8)

    def score(pixels: np.ndarray, index: int) -> float:
        r = client.post(
            "/classify",
            params={"model": "cifar10_resnet56", "top_k": 10},
            files={"file": ("x.png", _png_bytes(pixels))},
        )
        assert r.status_code == 200, r.text
        return next(p["score"] for p in r.json()["predictions"] if p["index"] == index)

    def drops_of(path: Path, y: int, x: int) -> dict[str, float]:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape == (32, 32, 3)
        r = _explain(client, _png_bytes(pixels), model="cifar10_resnet56")
        assert r.status_code == 200, r.text
        body = r.json()
        heat = np.array(body["heatmap"]["values"]).ravel()
        index = body["target"]["index"]
        before = score(pixels, index)
        order = np.argsort(heat, kind="stable")
        square = np.zeros((32, 32), bool)
        square[y : y + SIDE, x : x + SIDE] = True
        masks = {
            "highest": order[-SIDE * SIDE :],
            "lowest": order[: SIDE * SIDE],
            "random square": np.flatnonzero(square),
        }
        out = {}
        for name, idx in masks.items():
            grey = pixels.reshape(-1, 3).copy()
            grey[idx] = mean
            out[name] = before - score(grey.reshape(32, 32, 3), index)
        return out

    # each image's requests in turn, four images at a time (the squares drawn in file order)
    squares = [rng.integers(0, 32 - SIDE + 1, 2) for _ in files]
    with cf.ThreadPoolExecutor(4) as ex:
        rows = list(ex.map(lambda a: drops_of(a[0], *a[1]), zip(files, squares, strict=True)))
    drops = {k: [row[k] for row in rows] for k in ("highest", "lowest", "random square")}
    means = {k: float(np.mean(v)) for k, v in drops.items()}
    print(f"\ndeletion over HTTP, {len(files)} CIFAR-10 test images, ResNet-56: {means}")
    assert means["highest"] >= 3 * means["lowest"]
    assert means["highest"] > means["random square"]


def test_maps_do_not_survive_model_randomisation_over_http(tmp_path) -> None:
    """Adebayo et al. 2018 through the API: /explain of the trained ResNet-56 and of the same
    network re-initialised (a custom model), for the trained model's top-1 on the same 200
    images: their maps share almost no ranking (in process: mean Spearman 0.063)."""
    from app.catalog.cifar import CIFAR10_LABELS, cifar_resnet
    from tests.conftest import CIFAR_FILES, CIFAR_WEIGHTS, require_shared
    from tests.test_explain import spearman

    require_shared(CIFAR_WEIGHTS / CIFAR_FILES["cifar10_resnet56"], CIFAR_SAMPLE)
    (tmp_path / CIFAR_FILES["cifar10_resnet56"]).symlink_to(
        CIFAR_WEIGHTS / CIFAR_FILES["cifar10_resnet56"]
    )
    torch.manual_seed(0)
    torch.save(cifar_resnet(56).state_dict(), tmp_path / "r56_random.pt")
    (tmp_path / "cifar.txt").write_text("\n".join(CIFAR10_LABELS) + "\n")
    (tmp_path / "m.toml").write_text(
        '[models.r56_random]\narch = "cifar10_resnet56"\nweights = "r56_random.pt"\n'
        'labels = "cifar.txt"\npreprocess = "cifar"\n'
    )
    files = [p for c in sorted(CIFAR_SAMPLE.iterdir()) for p in sorted(c.glob("*.jpg"))[:PER_CLASS]]
    rhos = []
    with run_service(
        models="cifar10_resnet56,r56_random", weights_dir=tmp_path,
        model_config_file=tmp_path / "m.toml", explain_queue=64,
    ) as svc, httpx.Client(base_url=svc.url, timeout=120) as c:  # fmt: skip
        for path in files:
            data = path.read_bytes()
            trained = _explain(c, data, model="cifar10_resnet56")
            assert trained.status_code == 200, trained.text
            index = trained.json()["target"]["index"]
            rand = _explain(c, data, model="r56_random", target=index)
            assert rand.status_code == 200, rand.text
            a, b = (torch.tensor(r.json()["heatmap"]["values"]) for r in (trained, rand))
            rhos.append(0.0 if float(b.max()) == 0.0 else spearman(a, b))  # flat: unrelated
    mean = float(np.mean(rhos))
    print(f"\nrandomisation over HTTP, {len(files)} images: mean Spearman {mean:.3f}")
    assert len(rhos) == 200 and mean < 0.3


def test_an_explain_job_that_cannot_be_handed_over_is_503_and_frees_its_slot(monkeypatch) -> None:
    """As a batch: an explain job whose pixels cannot be placed in shared memory (/dev/shm
    full) is a 503 and gives its worker slot back; the next explanations run. (Before, the
    queue's feeder thread moved them there, and a failure lost the job silently until the
    watchdog killed the worker.)"""
    from app.engine import batcher as batcher_module

    real = batcher_module.stack_shared
    failures = [OSError(28, "No space left on device")]

    def stack(tensors):
        if failures:
            raise failures.pop()
        return real(tensors)

    monkeypatch.setattr(batcher_module, "stack_shared", stack)
    photo = images.encode(images.photo(), "PNG")
    with run_service(
        models="cifar10_plain20", allow_random_weights=True, request_timeout_s=30
    ) as svc, httpx.Client(base_url=svc.url, timeout=60) as c:  # fmt: skip

        def explain() -> httpx.Response:
            return c.post("/explain", params={"model": "cifar10_plain20"},
                          files={"file": ("a", photo)})  # fmt: skip

        first = explain()
        assert first.status_code == 503 and "retry shortly" in first.json()["detail"], first.text
        assert first.headers["retry-after"]
        for _ in range(3):  # more than the worker's two slots: each one freed again
            assert explain().status_code == 200
        assert not any(w.inflight for w in svc.service.pool.workers)


def test_a_checkpoint_gone_or_replaced_since_load_is_not_explained(tmp_path) -> None:
    """/explain builds its fp32 copy from the checkpoint on first use. A checkpoint deleted
    since the model was loaded made that a 500; one replaced in place was explained with the
    new weights while the old ones classified. Both are now 503 with the reason; the model
    still classifies, and loading it again (a restart here) explains again."""
    import shutil

    from tests.conftest import CIFAR_FILES, CIFAR_WEIGHTS, require_shared

    names = ("cifar10_resnet20", "cifar10_resnet32")
    require_shared(*(CIFAR_WEIGHTS / CIFAR_FILES[n] for n in names))
    for name in names:  # copies: the test changes them
        shutil.copy(CIFAR_WEIGHTS / CIFAR_FILES[name], tmp_path / CIFAR_FILES[name])
    data = shared_image("chelsea.png")
    with (
        run_service(models=",".join(names), weights_dir=tmp_path) as svc,
        httpx.Client(base_url=svc.url, timeout=120) as c,
    ):
        (tmp_path / CIFAR_FILES["cifar10_resnet20"]).unlink()
        replaced = tmp_path / CIFAR_FILES["cifar10_resnet32"]
        replaced.write_bytes(replaced.read_bytes())  # the same bytes, a new file: not the one
        for name in names:
            r = _explain(c, data, model=name)
            assert r.status_code == 503, r.text
            assert "was replaced since" in r.json()["detail"] and name in r.json()["detail"]
            r = c.post("/classify", params={"model": name}, files={"file": ("c.png", data)})
            assert r.status_code == 200, r.text
    with run_service(models="cifar10_resnet32", weights_dir=tmp_path) as svc:
        r = httpx.post(f"{svc.url}/explain", params={"model": "cifar10_resnet32"},
                       files={"file": ("c.png", data)}, timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
