"""/compare and the agreement metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.agreement import ModelOutput, agreement, jaccard, js_divergence
from tests import images
from tests.conftest import CIFAR_WEIGHTS, IMAGES, needs_shared, shared_image

PNG = images.encode(images.photo((320, 240)), "PNG")  # generated: no shared data needed


def out(name: str, probs, label_set: int = 1, k: int = 2) -> ModelOutput:
    p = np.asarray(probs, dtype=np.float32)
    return ModelOutput(name, p, ["a", "b", "c", "d"][: len(p)], label_set, k)


def test_js_divergence_by_hand():
    assert js_divergence(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4)
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = math.log2(1 / 0.75)
    expected = 0.5 * kl_p + 0.5 * kl_q  # 0.3113
    assert js_divergence(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(expected)


def test_jaccard_by_hand():
    assert jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(2 / 4)
    assert jaccard([1], [1]) == 1.0


def test_agreement_by_hand():
    a = out("a", [0.7, 0.2, 0.1, 0.0])  # top-2 {0, 1}
    b = out("b", [0.6, 0.0, 0.4, 0.0])  # top-2 {0, 2}
    c = out("c", [0.1, 0.1, 0.1, 0.7])  # top-2 {3, 0}
    other = out("cifar", [0.5, 0.5], label_set=2)
    result = agreement([a, b, c, other])
    assert result["top1_consensus"] == {"label": "a", "index": 0, "votes": 2, "of": 3}
    pairs = {(p["a"], p["b"]): p for p in result["pairwise"]}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}  # none with another label set
    assert pairs[("a", "b")]["top1_same"] is True
    assert pairs[("a", "b")]["topk_overlap"] == pytest.approx(1 / 3)
    assert pairs[("a", "c")]["top1_same"] is False
    assert pairs[("a", "c")]["topk_overlap"] == pytest.approx(1 / 3)
    assert pairs[("a", "b")]["js_divergence"] == pytest.approx(
        js_divergence(a.probs, b.probs), abs=1e-6
    )


def test_compare_over_http(client):
    r = client.post(
        "/compare",
        params={"models": "resnet18,r18_copy,alexnet,tiny3", "top_k": 5},
        files={"file": ("photo.png", PNG)},
        headers={"X-Request-ID": "cmp-1"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["model"] for x in body["results"]] == [
        "resnet18", "r18_copy", "alexnet", "tiny3",
    ]  # fmt: skip
    assert body["request_id"] == "cmp-1" and all(
        x["request_id"] == "cmp-1" for x in body["results"]
    )
    res = {x["model"]: x for x in body["results"]}
    # resnet18 and r18_copy are the same checkpoint with the same preprocessing: identical.
    assert res["resnet18"]["predictions"] == res["r18_copy"]["predictions"]
    pairs = {(p["a"], p["b"]): p for p in body["agreement"]["pairwise"]}
    assert set(pairs) == {
        ("resnet18", "r18_copy"),
        ("resnet18", "alexnet"),
        ("r18_copy", "alexnet"),
    }
    same = pairs[("resnet18", "r18_copy")]
    assert same["top1_same"] is True and same["topk_overlap"] == 1.0
    assert same["js_divergence"] == pytest.approx(0.0, abs=1e-6)
    # the top-k overlap with alexnet can be recomputed from the returned indices
    ia = {p["index"] for p in res["resnet18"]["predictions"]}
    ib = {p["index"] for p in res["alexnet"]["predictions"]}
    assert pairs[("resnet18", "alexnet")]["topk_overlap"] == pytest.approx(
        len(ia & ib) / len(ia | ib), abs=1e-6
    )
    assert 0.0 <= pairs[("resnet18", "alexnet")]["js_divergence"] <= 1.0
    consensus = body["agreement"]["top1_consensus"]
    assert consensus["of"] == 3  # the ImageNet-labelled group
    assert consensus["votes"] >= 2
    assert consensus["label"] == res["resnet18"]["predictions"][0]["label"]
    assert set(body["latency_ms"]) == {"decode", "total"}


@needs_shared(CIFAR_WEIGHTS, IMAGES)
def test_a_model_answers_in_a_compare_as_it_does_alone(client):
    """A model's predictions do not depend on the models it is compared with: the CIFAR
    ResNet's top-5 for a photo is the same in /classify and beside resnet18 in /compare (its
    JPEG was drafted for resnet18's larger target: another top-1 on some photos)."""
    for name in ("rocket.jpg", "hubble_deep_field.jpg"):
        photo = {"file": (name, shared_image(name))}
        alone = client.post("/classify", params={"model": "cifar10_resnet20"}, files=photo)
        compared = client.post(
            "/compare", params={"models": "cifar10_resnet20,resnet18"}, files=photo
        )
        assert alone.status_code == 200 and compared.status_code == 200, (alone, compared)
        want = [(p["label"], p["score"]) for p in alone.json()["predictions"]]
        got = [(p["label"], p["score"]) for p in compared.json()["results"][0]["predictions"]]
        assert [label for label, _ in got] == [label for label, _ in want], name
        assert [score for _, score in got] == pytest.approx([s for _, s in want], abs=1e-4), name


def test_compare_defaults_to_loaded_models(service, client):
    r = client.post("/compare", files={"file": ("c.png", PNG)})
    assert r.status_code == 200, r.text
    served = service.settings.models.split(",")  # 8 with the shared data, 4 without
    assert [x["model"] for x in r.json()["results"]] == served[:8]
