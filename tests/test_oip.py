"""The Open Inference Protocol (KServe v2 / Triton) against a real server, with tritonclient.

One server for the module: the real CIFAR-10 ResNet-20 and ``resnet18:IMAGENET1K_V1`` (a weights
variant's name, from the generated checkpoint), gRPC on a free port, and an API key. REST is
exercised here with tritonclient.http and httpx; gRPC with tritonclient.grpc in a subprocess
(tests/oip_grpc_checks.py), because tritonclient and imgcls register the same protobuf names.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as th
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from tests import images
from tests.conftest import (
    CIFAR_FILES,
    CIFAR_WEIGHTS,
    IMAGES,
    ROOT,
    free_port,
    needs_shared,
    require_shared,
    run_service,
    shared_image,
)

pytestmark = needs_shared

KEY = "oip-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def auth() -> dict[str, str]:
    """A fresh copy each call: tritonclient adds its own entries to the headers it is given."""
    return dict(AUTH)


PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png"]
CIFAR = "cifar10_resnet20"
R18 = "resnet18:IMAGENET1K_V1"
MAX_QUEUE = 16


@pytest.fixture(scope="module")
def oip(model_dir: Path):
    require_shared(CIFAR_WEIGHTS / CIFAR_FILES[CIFAR])
    with run_service(
        models=f"{CIFAR},{R18}",
        weights_dir=model_dir,
        grpc_port=free_port(),
        grpc_host="127.0.0.1",
        api_key=KEY,
        max_batch_size=8,
        max_batch_wait_ms=20,
        max_queue=MAX_QUEUE,
        max_upload_mb=2,
        max_inflight_mb=8,  # tests/oip_grpc_checks.py fills it to refuse a gRPC call
        model_control="explicit",  # the repository's load and unload (off by default)
    ) as running:
        yield running


@pytest.fixture
def http(oip):
    client = th.InferenceServerClient(
        oip.url.removeprefix("http://"), connection_timeout=60, network_timeout=120
    )
    yield client
    client.close()


def classify(oip, model: str, name: str, data: bytes) -> dict:
    r = httpx.post(
        f"{oip.url}/classify",
        params={"model": model, "top_k": 5},
        files={"file": (name, data)},
        headers=auth(),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def image_input(files: list[bytes], binary: bool = True) -> th.InferInput:
    inp = th.InferInput("IMAGE", [len(files)], "BYTES")
    if binary:
        inp.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
    else:  # JSON carries each image file in base64
        encoded = [base64.b64encode(f) for f in files]
        inp.set_data_from_numpy(np.array(encoded, dtype=object), binary_data=False)
    return inp


def text(element: bytes | str) -> str:
    return element.decode() if isinstance(element, bytes) else element


def post_infer(oip, doc: dict, model: str = CIFAR, **kw) -> httpx.Response:
    return httpx.post(
        f"{oip.url}/v2/models/{model}/infer", json=doc, headers=auth(), timeout=120, **kw
    )


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- health and metadata -----------------------------------------------------------------------
def test_server_metadata_and_health(oip, http):
    meta = http.get_server_metadata(headers=auth())
    assert meta["name"] == "imgcls"
    assert {"classification", "binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    assert http.is_server_live() and http.is_server_ready()  # open, like /healthz and /readyz


def test_model_metadata_and_ready_for_a_weights_variant(oip, http):
    meta = http.get_model_metadata(R18, headers=auth())  # "resnet18%3AIMAGENET1K_V1" in the URL
    assert meta["name"] == R18 and meta["versions"] == ["1"]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "IMAGE": ("BYTES", [-1]),
        "PIXELS": ("FP32", [-1, 3, 224, 224]),
    }
    assert meta["outputs"] == [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, 1000]}]
    assert http.get_model_metadata(CIFAR, "1", headers=auth())["outputs"][0]["shape"] == [-1, 10]
    assert http.is_model_ready(R18, headers=auth()) and http.is_model_ready(
        CIFAR, "1", headers=auth()
    )
    r = httpx.get(f"{oip.url}/v2/models/vgg16/ready", headers=auth())  # catalog model, not loaded
    assert (r.status_code, r.json()) == (503, {"name": "vgg16", "ready": False})
    r = httpx.get(f"{oip.url}/v2/models/nope/ready", headers=auth())
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = httpx.get(f"{oip.url}/v2/models/{CIFAR}/versions/2", headers=auth())
    assert r.status_code == 404 and "no version '2'" in r.json()["error"]


def test_unrouted_v2_paths_answer_in_the_protocols_form(oip):
    """No route (404) and no such method (405) under /v2 are {"error": ...}, as every other
    /v2 answer; elsewhere the app's {"detail": ...}."""
    for method, path, status in [
        ("GET", "/v2/bogus", 404),
        ("GET", "/v2/models/a%2Fb", 404),
        ("POST", f"/v2/models/{CIFAR}/versions//infer", 404),
        ("GET", f"/v2/models/{CIFAR}/infer", 405),
        ("DELETE", "/v2/health/live", 405),
    ]:
        r = httpx.request(method, f"{oip.url}{path}", headers=auth())
        assert r.status_code == status and set(r.json()) == {"error"}, (path, r.text)
        assert r.json()["error"], path
    r = httpx.get(f"{oip.url}/v2/models/{CIFAR}/infer", headers=auth())
    assert r.headers["allow"] == "POST"
    r = httpx.get(f"{oip.url}/bogus", headers=auth())
    assert r.status_code == 404 and set(r.json()) == {"detail"}
    r = httpx.post(f"{oip.url}/v2/repository/index", content=gzip.compress(b"{}"),
                   headers={**auth(), "Content-Encoding": "gzip"})  # fmt: skip
    assert r.status_code == 415 and "only infer requests" in r.json()["error"], r.text


def test_api_key_guards_all_but_health(oip):
    assert httpx.get(f"{oip.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{oip.url}/v2/health/ready").json() == {"ready": True}
    for path in ("/v2/health/live/", "/healthz/"):  # a trailing slash: redirected, not 401
        assert httpx.get(f"{oip.url}{path}", follow_redirects=True).status_code == 200, path
    for path in ("/v2/health/live", "/v2/health/ready"):  # HEAD, as on /healthz and /readyz
        r = httpx.head(f"{oip.url}{path}")
        assert r.status_code == 200 and not r.content, path
    for r in (
        httpx.get(f"{oip.url}/v2"),
        httpx.post(f"{oip.url}/v2/models/{CIFAR}/infer", json={}),
        httpx.post(f"{oip.url}/v2/repository/index"),
    ):
        assert r.status_code == 401 and "API key" in r.json()["error"]


# ---- inference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_image_batch_top1_matches_classify(oip, http, binary):
    files = [shared_image(n) for n in PHOTOS]
    out = th.InferRequestedOutput("PROBABILITIES", binary_data=binary, class_count=5)
    res = http.infer(CIFAR, [image_input(files, binary)], outputs=[out], headers=auth())
    top = res.as_numpy("PROBABILITIES")
    assert top.shape == (3, 5)
    for row, name, data in zip(top, PHOTOS, files, strict=True):
        parsed = [text(e).split(":", 2) for e in row]
        scores = [float(s) for s, _, _ in parsed]
        assert scores == sorted(scores, reverse=True)
        expected = classify(oip, CIFAR, name, data)["predictions"]
        _, index, label = parsed[0]
        assert (int(index), label) == (expected[0]["index"], expected[0]["label"])
        assert scores[0] == pytest.approx(expected[0]["score"], abs=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_pixels_preprocessed_by_the_client_match_image(oip, http, binary):
    from app.catalog import build_catalog
    from app.engine.decoding import decode_pixels
    from app.preprocess import normalize

    spec = build_catalog().get(CIFAR)
    files = [shared_image(n) for n in PHOTOS]
    pre = spec.transform  # decoded and resized as the server does (IMGCLS_JPEG_DRAFT=1)
    pixels = [decode_pixels(f, 10**8, {0: pre}, draft=True)[0][0] for f in files]
    x = np.stack([normalize(p, pre.mean, pre.std).numpy() for p in pixels])
    inp = th.InferInput("PIXELS", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = th.InferRequestedOutput("PROBABILITIES", binary_data=binary)
    probs = http.infer(CIFAR, [inp], outputs=[out], headers=auth()).as_numpy("PROBABILITIES")
    ref = http.infer(CIFAR, [image_input(files)], headers=auth()).as_numpy("PROBABILITIES")
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs, ref, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_pixels_reach_the_model_as_sent(oip, http):
    """PIXELS go to the model as the client's floats, not rounded to 8-bit pixels: a shift of
    0.4 of a pixel level, which rounding would erase, changes the answer."""
    from app.catalog import build_catalog
    from app.imaging import decode

    spec = build_catalog().get(CIFAR)
    x = spec.transform(decode(shared_image(PHOTOS[0]), 10**8)).numpy()[None].astype(np.float32)
    std = np.array(spec.transform.std, dtype=np.float32).reshape(1, 3, 1, 1)
    shifted = x + np.float32(0.4 / 255.0) / std

    def probs(pixels: np.ndarray) -> np.ndarray:
        inp = th.InferInput("PIXELS", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        return http.infer(CIFAR, [inp], headers=auth()).as_numpy("PROBABILITIES")

    a, b = probs(x), probs(shifted)
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, atol=0.05)  # the same image, nearly the same answer


def test_weights_variant_infers_like_classify(oip, http):
    files = [shared_image(n) for n in PHOTOS[:2]]
    probs = http.infer(R18, [image_input(files)], headers=auth()).as_numpy("PROBABILITIES")
    assert probs.shape == (2, 1000)
    for row, name, data in zip(probs, PHOTOS[:2], files, strict=True):
        expected = classify(oip, R18, name, data)["predictions"][0]
        assert int(np.argmax(row)) == expected["index"]
        assert float(row.max()) == pytest.approx(expected["score"], abs=1e-5)


def test_binary_response_carries_every_output_when_asked(oip):
    doc = {
        "id": "req-7",
        "parameters": {"binary_data_output": True},
        "inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [b64(tiny_png())]}],
    }
    r = post_infer(oip, doc)
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(r.content[:n])
    assert head["id"] == "req-7" and head["model_version"] == "1"
    (out,) = head["outputs"]
    assert out["parameters"]["binary_data_size"] == 40 == len(r.content) - n
    probs = np.frombuffer(r.content[n:], dtype="<f4")
    assert probs.shape == (10,) and probs.sum() == pytest.approx(1.0, abs=1e-4)


def test_images_of_a_request_are_counted_by_the_batcher(oip, http):
    def batched_images() -> float:
        text_ = httpx.get(f"{oip.url}/metrics", headers=auth()).text
        for family in text_string_to_metric_families(text_):
            if family.name == "imgcls_batch_size":
                return sum(
                    s.value
                    for s in family.samples
                    if s.name == "imgcls_batch_size_sum" and s.labels["model"] == CIFAR
                )
        return 0.0

    before = batched_images()
    files = [shared_image(n) for n in PHOTOS]
    http.infer(CIFAR, [image_input(files)], headers=auth())
    assert batched_images() - before == 3
    metrics = httpx.get(f"{oip.url}/metrics", headers=auth()).text
    assert f'endpoint="/v2/models/{{name}}/infer",model="{CIFAR}",status="200"' in metrics
    assert f"/v2/models/{CIFAR}" not in metrics  # templates, not paths: bounded labels


# ---- errors ------------------------------------------------------------------------------------
def _image(data: list, shape: list[int] | None = None, datatype: str = "BYTES") -> dict:
    return {"name": "IMAGE", "shape": shape or [len(data)], "datatype": datatype, "data": data}


def _pixels(shape: list[int], datatype: str = "FP32") -> dict:
    count = int(np.prod(shape))
    return {"name": "PIXELS", "shape": shape, "datatype": datatype, "data": [0] * count}


BAD_REQUESTS = {
    "image-not-bytes": ({"inputs": [_image([1.5], datatype="FP32")]}, "IMAGE must be BYTES"),
    "image-2d": ({"inputs": [_image(["x"], shape=[1, 1])]}, "IMAGE must have shape [N]"),
    "count-mismatch": ({"inputs": [_image(["x"], shape=[2])]}, "holds 2 elements but"),
    "pixels-int": ({"inputs": [_pixels([1, 3, 32, 32], "INT32")]}, "PIXELS must be FP32"),
    "pixels-size": ({"inputs": [_pixels([1, 3, 31, 32])]}, "[N, 3, 32, 32]"),
    "input-name": (
        {"inputs": [{**_image(["x"]), "name": "INPUT__0"}]},
        "unknown input 'INPUT__0'",
    ),
    "input-name-many-images": (  # an input no model takes: 400 for that, not 413 for its size
        {"inputs": [{"name": "FOO", "shape": [2**40], "datatype": "BYTES", "data": ["x"]}]},
        "unknown input 'FOO'",
    ),
    "two-inputs": ({"inputs": [_image(["x"]), _pixels([1, 3, 32, 32])]}, "send one input"),
    "output-name": (
        {"inputs": [_image(["x"])], "outputs": [{"name": "LOGITS"}]},
        "unknown output 'LOGITS'",
    ),
    "classification-str": (
        {
            "inputs": [_image(["x"])],
            "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": "5"}}],
        },
        "classification must be a positive integer",
    ),
    "no-inputs": ({"inputs": []}, "invalid inference request"),
    "datatype": ({"inputs": [_image(["x"], datatype="STRING")]}, "unknown or unsupported datatype"),
    "long-datatype": (  # quoted cut to 120 characters
        {"inputs": [_image(["x"], datatype="S" * 5000)]},
        "unknown or unsupported datatype 'SSSS",
    ),
    "bad-base64": ({"inputs": [_image(["!!"])]}, "IMAGE[0]: not valid base64"),
    "undecodable": (
        {"inputs": [_image([b64(tiny_png()), b64(b"GIF89a no image here")])]},
        "IMAGE[1]: ",
    ),
    "too-many": ({"inputs": [_image([b64(tiny_png())] * (MAX_QUEUE + 1))]}, "IMGCLS_MAX_QUEUE"),
    "ragged": (
        {"inputs": [{**_pixels([1, 3, 32, 32]), "data": [[0] * 3071, [0]]}]},
        "ragged data: lists of 3071 and 1 elements",
    ),
    "mixed-nesting": (
        {"inputs": [{**_pixels([1, 3, 32, 32]), "data": [[0] * 3071, 0]}]},
        "mixes lists and values",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_answer_400_naming_the_problem(oip, case):
    doc, fragment = BAD_REQUESTS[case]
    r = post_infer(oip, doc)
    assert r.status_code == (413 if case == "too-many" else 400), r.text
    assert fragment in r.json()["error"]
    assert len(r.json()["error"]) < 400  # what the client sent is quoted cut short


def test_images_are_counted_before_their_data_is_read(oip):
    """A binary IMAGE tensor of millions of elements (4 bytes each, when empty) is refused from
    its shape (413) before the elements are read one by one: here the data holds two, and the
    shape's count is what the answer names."""
    n = 4_000_000
    blob = serialize_byte_tensor(np.array([b"", b""], dtype=object)).item()
    head = json.dumps({"inputs": [{"name": "IMAGE", "shape": [n], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()  # fmt: skip
    r = httpx.post(
        f"{oip.url}/v2/models/{CIFAR}/infer", content=head + blob, timeout=60,
        headers={**auth(), "Inference-Header-Content-Length": str(len(head))},
    )  # fmt: skip
    assert r.status_code == 413, r.text
    assert f"{n} images" in r.json()["error"] and "IMGCLS_MAX_QUEUE" in r.json()["error"]


def test_a_file_sent_as_uint8_is_told_its_datatype_not_its_count(oip):
    """A common client mistake: the image file sent as a UINT8 tensor of its bytes, shape
    [file size]. Its count is far over IMGCLS_MAX_QUEUE, but the answer is the datatype's 400,
    over REST and over gRPC, not a 413 asking for fewer images."""
    import grpc

    from app.oip.generated import grpc_predict_v2_pb2 as pb
    from app.oip.generated import grpc_predict_v2_pb2_grpc as pb_grpc

    photo = shared_image(PHOTOS[0])
    assert len(photo) > MAX_QUEUE
    head = json.dumps({"inputs": [{"name": "IMAGE", "shape": [len(photo)], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": len(photo)}}]}).encode()  # fmt: skip
    r = httpx.post(
        f"{oip.url}/v2/models/{CIFAR}/infer", content=head + photo, timeout=60,
        headers={**auth(), "Inference-Header-Content-Length": str(len(head))},
    )  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "IMAGE must be BYTES, got UINT8"

    request = pb.ModelInferRequest(model_name=CIFAR, raw_input_contents=[photo])
    request.inputs.add(name="IMAGE", datatype="UINT8", shape=[len(photo)])
    with grpc.insecure_channel(f"127.0.0.1:{oip.settings.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "IMAGE must be BYTES, got UINT8"


def test_malformed_bodies(oip):
    url = f"{oip.url}/v2/models/{CIFAR}/infer"

    def post(content: bytes, length: int | str | None) -> httpx.Response:
        headers = auth()
        if length is not None:
            headers["Inference-Header-Content-Length"] = str(length)
        return httpx.post(url, content=content, headers=headers, timeout=60)

    head = json.dumps(
        {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                     "parameters": {"binary_data_size": 100}}]}
    ).encode()  # fmt: skip
    blob = serialize_byte_tensor(np.array([tiny_png()], dtype=object)).item()
    cases = {
        "not-json": post(b"\x89PNG...", None),
        "length-not-int": post(head, "ten"),
        "length-past-body": post(head, len(head) + 1),
        "size-past-body": post(head + blob[:50], len(head)),
        "bytes-truncated": post(
            head.replace(b"100", str(len(blob) - 3).encode()) + blob[:-3], len(head)
        ),
        "left-over": post(head.replace(b"100", str(len(blob)).encode()) + blob + b"xx", len(head)),
        "length-underscore": post(head, "1_0"),
        "length-plus": post(head, "+5"),
        "length-long": post(head, "x" * 8000),
    }
    for name, r in cases.items():
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"] and len(r.json()["error"]) < 400, name  # quoted cut short
    good = head.replace(b"100", str(len(blob)).encode())
    r = post(good + blob, len(good))  # the same server still answers
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")  # no binary output asked


def test_nested_data_as_its_shape_and_an_empty_outputs_list(oip):
    """JSON data nested as its shape answers as the same data flat; ``"outputs": []`` asks for
    every output, as gRPC reads an empty list."""
    x = np.linspace(-2, 2, 2 * 3 * 32 * 32, dtype=np.float32).reshape(2, 3, 32, 32)
    answers = []
    for data, outputs in ((x.ravel().tolist(), None), (x.tolist(), []), (x.tolist(), None)):
        doc: dict = {"inputs": [{"name": "PIXELS", "shape": [2, 3, 32, 32], "datatype": "FP32",
                                 "data": data}]}  # fmt: skip
        if outputs is not None:
            doc["outputs"] = outputs
        r = post_infer(oip, doc)
        assert r.status_code == 200, r.text
        (out,) = r.json()["outputs"]
        assert out["name"] == "PROBABILITIES" and out["shape"] == [2, 10]
        answers.append(out["data"])
    assert answers[0] == answers[1] == answers[2]


def test_json_past_its_value_cap_is_413_before_it_is_parsed(oip):
    """Each JSON value costs ~35 bytes as a Python object while it is parsed: more than
    codec.MAX_JSON_VALUES are refused from a count of commas, and the answer says to send such
    tensors as binary data."""
    from app.oip.codec import MAX_JSON_VALUES

    n = MAX_JSON_VALUES + 1
    body = (
        b'{"inputs":[{"name":"PIXELS","shape":[%d],"datatype":"FP32","data":[' % n
        + b"0," * (n - 1) + b"0]}]}"
    )  # fmt: skip
    r = httpx.post(f"{oip.url}/v2/models/{CIFAR}/infer", content=body, headers=auth(), timeout=60)
    assert r.status_code == 413, r.text
    assert f"more than {MAX_JSON_VALUES:,} values" in r.json()["error"]
    assert "binary_data_size" in r.json()["error"]


def test_large_json_is_parsed_off_the_event_loop(oip, monkeypatch):
    """A JSON part over codec.PARSE_INLINE_BYTES is read on a thread (pydantic then the values),
    a small one on the event loop, where a thread hop would cost more than the parse."""
    from app.oip import codec

    parse = codec.decode_request
    on_loop: list[bool] = []

    def recording(*args: object, **kw: object):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return parse(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "decode_request", recording)
    small = {"inputs": [_pixels([1, 3, 32, 32])]}  # ~9 KB of JSON
    large = {"inputs": [{**_pixels([8, 3, 32, 32]), "data": [0.125] * (8 * 3 * 32 * 32)}]}
    for doc in (small, large):
        r = post_infer(oip, doc)
        assert r.status_code == 200, r.text
    assert on_loop == [True, False]


def test_pixels_that_overflow_inside_the_model_are_400_and_it_still_serves(tmp_path: Path):
    """Normalised pixels within the accepted range can still overflow inside a model at its
    precision (fp16, CUDA's default, tops out at 65,504): the output is not finite, and that is
    the client's values, 400, not a server fault. Here a real resnet18 whose classifier weights
    are scaled by 1e36 overflows in fp32 on values of ±1e4, and answers ordinary images; one
    whose classifier bias is NaN fails on any input, which stays a server fault."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(2)
    model = resnet18(num_classes=3).eval()
    with torch.no_grad():
        model.fc.weight.mul_(1e36)
        model.fc.bias.zero_()
    torch.save(model.state_dict(), tmp_path / "loud3.pt")
    with torch.no_grad():  # a broken model: NaN out of any input
        model.fc.bias.fill_(float("nan"))
    torch.save(model.state_dict(), tmp_path / "broken3.pt")
    (tmp_path / "abc.txt").write_text("a\nb\nc\n")
    (tmp_path / "models.toml").write_text(
        "".join(
            f'[models.{name}]\narch = "resnet18"\nweights = "{name}.pt"\nlabels = "abc.txt"\n'
            "preprocess = { resize = 32 }\n"
            for name in ("loud3", "broken3")
        )
    )
    with run_service(
        models="loud3,broken3", weights_dir=tmp_path, model_config_file=tmp_path / "models.toml"
    ) as svc:
        x = np.zeros((1, 3, 32, 32), dtype="<f4")
        x[0, :, ::2], x[0, :, 1::2] = 1e4, -1e4

        def infer(pixels: np.ndarray, model: str = "loud3") -> httpx.Response:
            head = json.dumps({"inputs": [{"name": "PIXELS", "shape": list(pixels.shape),
                                           "datatype": "FP32",
                                           "parameters": {"binary_data_size": pixels.nbytes}}]}
                              ).encode()  # fmt: skip
            return httpx.post(
                f"{svc.url}/v2/models/{model}/infer", content=head + pixels.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(head))}, timeout=60,
            )  # fmt: skip

        r = infer(x)
        assert r.status_code == 400, r.text
        assert "overflows on these pixel values" in r.json()["error"]
        assert infer(np.zeros_like(x)).status_code == 200
        r = httpx.post(f"{svc.url}/classify", params={"model": "loud3"},
                       files={"file": ("c.png", shared_image("chelsea.png"))}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        # NaN from values in a preset's range is the model's fault, not the client's: 500
        r = infer(np.zeros_like(x), "broken3")
        assert r.status_code == 500 and "inference failed on the server" in r.json()["error"]


def test_non_finite_pixels_are_refused(oip):
    x = np.zeros((1, 3, 32, 32), dtype="<f4")
    x[0, 1, 2, 3] = np.nan
    head = json.dumps(
        {"inputs": [{"name": "PIXELS", "shape": [1, 3, 32, 32], "datatype": "FP32",
                     "parameters": {"binary_data_size": x.nbytes}}]}
    ).encode()  # fmt: skip
    r = httpx.post(
        f"{oip.url}/v2/models/{CIFAR}/infer",
        content=head + x.tobytes(),
        headers={**auth(), "Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 400 and "NaN" in r.json()["error"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_as_tritonclient_sends_them(oip, http, algorithm):
    """tritonclient's request_compression_algorithm (Content-Encoding: gzip or deflate): the
    same answers as the plain request."""
    files = [shared_image(n) for n in PHOTOS]
    plain = http.infer(CIFAR, [image_input(files)], headers=auth()).as_numpy("PROBABILITIES")
    packed = http.infer(
        CIFAR, [image_input(files)], headers=auth(), request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    ).as_numpy("PROBABILITIES")  # fmt: skip
    np.testing.assert_array_equal(packed, plain)


def _deflate_raw(data: bytes) -> bytes:
    z = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


def test_other_compressed_forms_and_their_errors(oip):
    """Raw deflate and multi-member gzip are read too; an unknown coding is 415 before the body
    is read; a body that is not what it says, cut short or followed by more is 400; one that is
    over IMGCLS_OIP_MAX_REQUEST_MB once decompressed is 413; the bytes it decompresses to count
    against IMGCLS_MAX_INFLIGHT_MB (503)."""
    doc = {"inputs": [_image([b64(tiny_png())])]}
    body = json.dumps(doc).encode()
    url = f"{oip.url}/v2/models/{CIFAR}/infer"

    def post(data: bytes, coding: str) -> httpx.Response:
        return httpx.post(url, content=data, headers={**auth(), "Content-Encoding": coding},
                          timeout=120)  # fmt: skip

    plain = httpx.post(url, content=body, headers=auth(), timeout=120)
    assert plain.status_code == 200, plain.text
    half = len(body) // 2
    for data, coding in [
        (_deflate_raw(body), "deflate"),
        (gzip.compress(body[:half]) + gzip.compress(body[half:]), "gzip"),  # two members
        (gzip.compress(body) + b"\0" * 8, "x-gzip"),  # zero padding after the member
        (body, "identity"),
        (gzip.compress(body), "GZIP, identity"),
    ]:
        r = post(data, coding)
        assert r.status_code == 200, (coding, r.text)
        assert r.json()["outputs"] == plain.json()["outputs"], coding
    for coding in ("br", "zstd", "gzip, deflate"):
        r = post(gzip.compress(body), coding)
        assert r.status_code == 415 and "gzip, deflate or none" in r.json()["error"], r.text
    packed = gzip.compress(body)
    for data, said in [
        (zlib.compress(body), "not valid gzip"),
        (packed[: len(packed) // 2], "cut short"),
        (packed + b"more", "follow the gzip request body"),
        (gzip.compress(b" ") * 200_000 + packed, "more than 64 gzip members"),  # ~4 MB
    ]:
        r = post(data, "gzip")
        assert r.status_code == 400 and said in r.json()["error"], r.text
    limit = 64 * 1024 * 1024  # IMGCLS_OIP_MAX_REQUEST_MB's default
    bomb = gzip.compress(b" " * (limit + 1), 9)  # 65 KB that would take 64 MB
    assert len(bomb) < 100_000
    r = post(bomb, "gzip")
    assert r.status_code == 413 and "once decompressed" in r.json()["error"], r.text
    # 9 MB of JSON spaces, over the service's 8 MB of request bodies in flight beside the
    # compressed body it holds: refused before it is parsed
    r = post(gzip.compress(b" " * (9 * 1024 * 1024) + body), "gzip")
    assert r.status_code == 503 and "IMGCLS_MAX_INFLIGHT_MB" in r.json()["error"], r.text
    assert r.headers["Retry-After"]
    r = post(gzip.compress(b" " * (3 * 1024 * 1024) + body), "gzip")  # under it: answered
    assert r.status_code == 200, r.text
    assert oip.app.state.upload_budget.used == 0  # every reservation given back


def test_statistics_count_what_the_model_ran(oip, http):
    """Triton's statistics extension, as tritonclient reads it (get_inference_statistics):
    counted per image; an image the worker cannot decode counts as a failure; the times add
    up (an image's time in the server covers its queue and its batch's forward pass)."""

    def stats() -> dict:
        (one,) = http.get_inference_statistics(CIFAR, headers=auth())["model_stats"]
        assert one["name"] == CIFAR and one["version"] == "1"
        return one

    def grew(after: dict, before: dict, *path: str) -> int:
        for key in path:
            after, before = after[key], before[key]
        return int(after) - int(before)

    before = stats()
    files = [shared_image(n) for n in PHOTOS]
    http.infer(CIFAR, [image_input(files)], headers=auth())
    after = stats()
    assert grew(after, before, "inference_count") == 3
    assert 1 <= grew(after, before, "execution_count") <= 3
    for what in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert grew(after, before, "inference_stats", what, "count") == 3, what
    assert grew(after, before, "inference_stats", "fail", "count") == 0
    spent = {
        w: grew(after, before, "inference_stats", w, "ns")
        for w in ("success", "queue", "compute_infer")
    }
    assert (
        spent["compute_infer"] > 0 and spent["success"] >= spent["queue"] + spent["compute_infer"]
    )
    batches = after["batch_stats"]
    assert sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in batches) == int(
        after["inference_count"]
    )
    assert sum(int(b["compute_infer"]["count"]) for b in batches) == int(after["execution_count"])
    assert int(after["last_inference"]) / 1000 == pytest.approx(time.time(), abs=60)
    # a file whose header passes the API's check, and that the worker cannot decode
    buf = io.BytesIO()
    Image.open(io.BytesIO(files[0])).convert("RGB").save(buf, "JPEG", quality=90)
    broken = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(InferenceServerException):
        http.infer(CIFAR, [image_input([broken])], headers=auth())
    failed = stats()
    assert grew(failed, after, "inference_stats", "fail", "count") == 1
    assert grew(failed, after, "inference_count") == 0
    # every loaded model without a name, the version's path, and the errors
    every = httpx.get(f"{oip.url}/v2/models/stats", headers=auth()).json()["model_stats"]
    assert {m["name"] for m in every} >= {CIFAR, R18}
    r = httpx.get(f"{oip.url}/v2/models/{CIFAR}/versions/1/stats", headers=auth())
    assert r.status_code == 200 and r.json()["model_stats"][0]["name"] == CIFAR
    for path, said in [("nope/stats", "unknown model"), (f"{CIFAR}/versions/2/stats", "version"),
                       ("vgg16/stats", "not loaded")]:  # fmt: skip
        r = httpx.get(f"{oip.url}/v2/models/{path}", headers=auth())
        assert r.status_code == 404 and said in r.json()["error"], (path, r.text)
    assert "statistics" in http.get_server_metadata(headers=auth())["extensions"]


def test_tritonclient_sees_the_status_codes(oip, http):
    with pytest.raises(InferenceServerException) as info:
        http.infer("nope", [image_input([tiny_png()])], headers=auth())
    assert info.value.status() == "404" and "unknown model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        http.infer(CIFAR, [image_input([tiny_png(), b"\x00" * 10])], headers=auth())
    assert info.value.status() == "400" and info.value.message().startswith("IMAGE[1]:")


def test_binary_images_are_views_into_the_body_not_copies():
    """Issue 12, point 5: a /v2 upload is held once. The codec reads the binary tensor data as
    tritonclient writes it (``serialize_byte_tensor``) and hands the image files on as views into
    the request body; only the JSON header is copied out to be parsed."""
    from app.oip import codec

    files = [b"\xff\xd8" + os.urandom(3000), b"\x89PNG" + os.urandom(1000)]
    blob = serialize_byte_tensor(np.array(files, dtype=np.object_)).item()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    body = bytearray(head + blob)
    data = codec.decode_request(body, str(len(head)), "m", None).inputs[0].data
    assert [bytes(d) for d in data] == files
    assert all(isinstance(d, memoryview) and d.obj is body for d in data)


def test_retry_after_and_status_mapping(caplog):
    """The core's mapping as both doors use it: overload and not-ready carry a retry hint, the
    core's 422 is the protocol's 400, and a server fault is logged and answered generically with
    the request id."""
    from app.engine.batcher import QueueFullError
    from app.errors import InvalidParameterError, ModelNotReadyError
    from app.oip.failures import ProtocolError, answer, failure

    assert (failure(QueueFullError("full")).status, failure(QueueFullError("x")).retry_after) == (
        503, 1,
    )  # fmt: skip
    assert failure(ModelNotReadyError("loading", retry_after=5)).retry_after == 5
    assert failure(TimeoutError()).status == 504
    assert failure(InvalidParameterError("shape [3, 31, 32]")).status == 400
    assert failure(ProtocolError("nope", 404)).status == 404
    internal = failure(RuntimeError("secret detail"))
    assert internal.status == 500 and internal.internal and "secret" not in internal.message
    with caplog.at_level("ERROR", logger="imgcls.oip"):
        why = answer(RuntimeError("secret detail"), "rid-42", "/v2/models/x/infer")
    assert why.status == 500 and "rid-42" in why.message and "secret" not in why.message
    (record,) = [r for r in caplog.records if r.name == "imgcls.oip"]
    assert "secret detail" in record.getMessage() and record.exc_info is not None


# ---- model repository --------------------------------------------------------------------------
def test_load_and_unload_are_off_unless_model_control_is_explicit(client, service):
    """By default (IMGCLS_MODEL_CONTROL=none, as Triton's default mode) no client can load a
    model, which may download weights and takes /readyz to 503 while it loads or if it fails,
    nor unload one: 403 naming the setting. The index stays readable; readiness is untouched."""
    assert service.settings.model_control == "none"
    before = client.get("/readyz").status_code
    for action, name in (("load", "vgg16"), ("unload", "cifar10_resnet20")):
        r = client.post(f"/v2/repository/models/{name}/{action}")
        assert r.status_code == 403, r.text
        assert "IMGCLS_MODEL_CONTROL=explicit" in r.json()["error"]
    r = client.post("/v2/repository/index")
    assert r.status_code == 200
    states = {e["name"]: e["state"] for e in r.json()}
    assert states["vgg16"] == "UNAVAILABLE" and states["cifar10_resnet20"] == "READY"
    assert client.get("/readyz").status_code == before == 200


def test_repository_index(oip, http):
    index = {m["name"]: m for m in http.get_model_repository_index(headers=auth())}
    assert index[CIFAR]["state"] == "READY" and index[R18]["state"] == "READY"
    assert index["vgg16"]["state"] == "UNAVAILABLE" and index["vgg16"]["reason"]
    r = httpx.post(f"{oip.url}/v2/repository/index", json={"ready": True}, headers=auth())
    assert {m["name"] for m in r.json()} == {CIFAR, R18}
    r = httpx.post(f"{oip.url}/v2/repository/index", json={"ready": "yes"}, headers=auth())
    assert r.status_code == 400


def test_load_and_unload_answer_for_unknown_and_loaded_models(oip, http):
    http.load_model(CIFAR, headers=auth())  # loaded at start: ready at once
    for action in ("load", "unload"):
        r = httpx.post(f"{oip.url}/v2/repository/models/nope/{action}", headers=auth())
        assert r.status_code == 404, r.text


# A catalog model the module's server was not started with; its real checkpoint is in model_dir.
TARGET = "cifar10_resnet32"


def index_entry(oip, name: str) -> dict:
    r = httpx.post(f"{oip.url}/v2/repository/index", headers=auth(), timeout=30)
    assert r.status_code == 200, r.text
    return {m["name"]: m for m in r.json()}[name]


def models_by_status(oip) -> dict[str, float]:
    """The ``imgcls_models`` gauge: served models by status."""
    text_ = httpx.get(f"{oip.url}/metrics", headers=auth()).text
    (family,) = [f for f in text_string_to_metric_families(text_) if f.name == "imgcls_models"]
    return {s.labels["status"]: s.value for s in family.samples}


def served_state(oip, name: str) -> tuple[str, bool]:
    """What /models says of ``name``, and whether /info lists it (the page reads both)."""
    entry = httpx.get(f"{oip.url}/models/{name}", headers=auth()).json()
    info = httpx.get(f"{oip.url}/info", headers=auth()).json()
    return entry["status"], name in info["models"]


def test_load_infer_unload_infer(oip, http):
    assert index_entry(oip, TARGET)["state"] == "UNAVAILABLE"
    assert served_state(oip, TARGET) == ("not-loaded", False)
    assert not http.is_model_ready(TARGET, headers=auth())
    ready_before = models_by_status(oip)["ready"]

    http.load_model(TARGET, headers=auth())  # answers once the workers have it ready
    assert index_entry(oip, TARGET)["state"] == "READY"
    assert http.is_model_ready(TARGET, headers=auth())
    assert served_state(oip, TARGET) == ("ready", True)
    assert httpx.get(f"{oip.url}/readyz").status_code == 200
    assert models_by_status(oip)["ready"] == ready_before + 1
    files = [shared_image(n) for n in PHOTOS]
    probs = http.infer(TARGET, [image_input(files)], headers=auth()).as_numpy("PROBABILITIES")
    for row, name, data in zip(probs, PHOTOS, files, strict=True):  # the real ResNet-32
        assert int(np.argmax(row)) == classify(oip, TARGET, name, data)["predictions"][0]["index"]

    def unloads_counted() -> float:
        row = (f'imgcls_requests_total{{endpoint="/v2/repository/models/{{name}}/unload",'
               f'model="{TARGET}",status="200"}} ')  # fmt: skip
        text = httpx.get(f"{oip.url}/metrics", headers=auth()).text
        return sum(float(x[len(row) :]) for x in text.splitlines() if x.startswith(row))

    unloads = unloads_counted()
    http.unload_model(TARGET, headers=auth())  # answers once the queue drained and it is freed
    # counted under the model it unloaded (served when it came), not "unknown"
    assert unloads_counted() == unloads + 1
    entry = index_entry(oip, TARGET)
    assert entry["state"] == "UNAVAILABLE" and entry["reason"]
    assert served_state(oip, TARGET) == ("not-loaded", False)
    assert not http.is_model_ready(TARGET, headers=auth())
    assert httpx.get(f"{oip.url}/readyz").status_code == 200
    assert models_by_status(oip)["ready"] == ready_before
    with pytest.raises(InferenceServerException) as info:
        http.infer(TARGET, [image_input(files[:1])], headers=auth())
    assert info.value.status() == "404" and "not loaded" in info.value.message()
    r = httpx.post(f"{oip.url}/classify", params={"model": TARGET}, files={"file": files[0]},
                   headers=auth())  # fmt: skip
    assert r.status_code == 404  # every door agrees


def test_a_failed_load_answers_503_and_readiness_follows(oip):
    """vgg16 has no weights here (no download, no random weights): the load fails with the
    reason, /readyz turns 503 naming it until it is unloaded."""
    r = httpx.post(f"{oip.url}/v2/repository/models/vgg16/load", headers=auth(), timeout=60)
    assert r.status_code == 503 and "missing-weights" in r.json()["error"], r.text
    assert r.headers["Retry-After"]
    assert "weights" in index_entry(oip, "vgg16")["reason"]
    ready = httpx.get(f"{oip.url}/readyz")
    assert ready.status_code == 503 and any("vgg16" in m for m in ready.json()["not_ready"])
    assert httpx.get(f"{oip.url}/v2/health/ready").status_code == 503
    assert httpx.head(f"{oip.url}/v2/health/ready").status_code == 503
    r = httpx.post(f"{oip.url}/v2/repository/models/vgg16/unload", headers=auth(), timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{oip.url}/readyz").status_code == 200
    assert index_entry(oip, "vgg16")["state"] == "UNAVAILABLE"


def test_a_model_whose_load_failed_is_loaded_again_once_its_checkpoint_is_fixed(oip, model_dir):
    """A broken checkpoint fails the load on the worker (503, failed); once a good file replaces
    it, the next load asks the workers again and the model serves, as Triton's load does (it
    used to answer the old failure at once, until a worker restart)."""
    from torchvision.models import resnet34

    from app.catalog import build_catalog
    from app.engine.decoding import decode_pixels
    from app.preprocess import normalize

    name = "resnet34"
    path = build_catalog().get(name).weights_path(model_dir)
    assert not path.exists()
    torch.manual_seed(0)
    good = resnet34().eval()
    try:
        torch.save(good.state_dict(), path)
        path.write_bytes(path.read_bytes()[:100_000])  # a copy cut short
        url = f"{oip.url}/v2/repository/models/{name}"
        r = httpx.post(f"{url}/load", headers=auth(), timeout=120)
        assert r.status_code == 503 and "failed" in r.json()["error"], r.text
        torch.save(good.state_dict(), path)
        r = httpx.post(f"{url}/load", headers=auth(), timeout=120)
        assert r.status_code == 200, r.text
        assert index_entry(oip, name)["state"] == "READY"
        # it serves the good checkpoint: the served answer is that network's (fp32 eager)
        photo = shared_image(PHOTOS[0])
        top = classify(oip, name, PHOTOS[0], photo)["predictions"][0]
        pre = build_catalog().get(name).transform
        pixels = decode_pixels(photo, 10**8, {0: pre}, draft=True)[0][0]
        with torch.no_grad():
            want = good(normalize(pixels, pre.mean, pre.std)[None]).softmax(1)[0]
        assert top["score"] == pytest.approx(float(want.max()), abs=1e-4)
        assert float(want[top["index"]]) == pytest.approx(float(want.max()), abs=1e-4)
    finally:
        httpx.post(f"{oip.url}/v2/repository/models/{name}/unload", headers=auth(), timeout=60)
        path.unlink(missing_ok=True)


def test_repository_calls_need_the_key(oip):
    refused = f'imgcls_requests_total{{endpoint="/v2/repository/models/{{name}}/unload",model="{CIFAR}",status="401"}} '

    def count() -> float:
        text_ = httpx.get(f"{oip.url}/metrics", headers=auth()).text
        return sum(float(x[len(refused) :]) for x in text_.splitlines() if x.startswith(refused))

    before = count()
    for path in ("index", f"models/{TARGET}/load", f"models/{CIFAR}/unload"):
        r = httpx.post(f"{oip.url}/v2/repository/{path}", timeout=60)
        assert r.status_code == 401 and "API key" in r.json()["error"], path
        r = httpx.post(f"{oip.url}/v2/repository/{path}", headers={"Authorization": "Bearer x"})
        assert r.status_code == 401, path
    assert index_entry(oip, TARGET)["state"] == "UNAVAILABLE"  # nothing was loaded
    assert index_entry(oip, CIFAR)["state"] == "READY"  # nor unloaded
    # answered before routing, yet counted under the route's template and model
    assert count() == before + 2


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_unload_lets_queued_requests_finish(oip, http):
    """With requests in flight and queued, unload refuses new ones (404) and answers the
    others: the queue drains before the model is freed."""
    http.load_model(TARGET, headers=auth())
    service = oip.service
    pool, batcher = service.pool, service.batchers[TARGET]
    files = [shared_image(n) for n in PHOTOS[:2]]
    doc = {"inputs": [_image([b64(f) for f in files])]}

    def infer() -> httpx.Response:
        return post_infer(oip, doc, model=TARGET)

    stopped: list[int] = []
    ex = ThreadPoolExecutor(6)
    try:
        for w in pool.workers:  # hold the worker: batches wait in it and in the queue
            os.kill(w.pid, signal.SIGSTOP)
            stopped.append(w.pid)
        running = ex.submit(infer)  # one batch in the worker (a worker takes one unfull batch)
        wait_for(lambda: any(w.inflight for w in pool.workers))
        queued = [ex.submit(infer) for _ in range(3)]
        wait_for(lambda: batcher.depth == 3 * len(files))
        unload = ex.submit(httpx.post, f"{oip.url}/v2/repository/models/{TARGET}/unload",
                           headers=auth(), timeout=120)  # fmt: skip
        wait_for(lambda: TARGET not in service.served)  # unloading: new requests refused
        late = infer()
        assert late.status_code == 404 and "not loaded" in late.json()["error"], late.text
        assert not unload.done()  # still draining: the worker holds the queue
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        ex.shutdown(wait=True)
    for f in [running, *queued]:
        r = f.result()
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [2, 10]
    assert unload.result().status_code == 200
    assert index_entry(oip, TARGET)["state"] == "UNAVAILABLE"
    assert infer().status_code == 404


def test_page_model_list_follows_load_and_unload(oip, browser):
    """The demo page lists the served models (from /models) each time it loads: a loaded model
    among them, ready to pick; an unloaded one back under "not loaded", disabled."""
    box = f"input[name=models][value='{TARGET}']"
    context = browser.new_context(extra_http_headers=auth())
    page = context.new_page()

    def listed() -> bool:
        page.goto(oip.url + "/")
        page.wait_for_selector("#model-groups[aria-busy=false]")
        assert page.is_enabled(f"input[name=models][value='{CIFAR}']")
        served = page.query_selector(f"fieldset > .model-option {box}") is not None
        not_loaded = page.query_selector(f"fieldset > details {box}") is not None
        assert served != not_loaded and page.is_enabled(box) == served
        return served

    try:
        assert not listed()
        httpx.post(f"{oip.url}/v2/repository/models/{TARGET}/load", headers=auth(),
                   timeout=300).raise_for_status()  # fmt: skip
        assert listed()
        httpx.post(f"{oip.url}/v2/repository/models/{TARGET}/unload", headers=auth(),
                   timeout=300).raise_for_status()  # fmt: skip
        assert not listed()
    finally:
        context.close()


def test_page_picks_up_a_model_that_becomes_ready_without_a_reload(oip, browser):
    """A model still loading when the page opened is shown disabled, "loading"; the page reads
    /models again while one is loading and enables it once ready, keeping what the user
    checked."""
    box = f"input[name=models][value='{TARGET}']"
    pool = oip.service.pool
    context = browser.new_context(extra_http_headers=auth())
    page = context.new_page()
    stopped: list[int] = []
    ex = ThreadPoolExecutor(1)
    try:
        for w in pool.workers:  # hold the workers: the load cannot finish before the page shows it
            os.kill(w.pid, signal.SIGSTOP)
            stopped.append(w.pid)
        load = ex.submit(httpx.post, f"{oip.url}/v2/repository/models/{TARGET}/load",
                         headers=auth(), timeout=300)  # fmt: skip
        wait_for(lambda: index_entry(oip, TARGET)["state"] == "LOADING")
        page.goto(oip.url + "/")
        page.wait_for_selector("#model-groups[aria-busy=false]")
        assert page.query_selector(f"fieldset > .model-option {box}") is not None  # served
        assert not page.is_enabled(box)
        assert "loading" in page.inner_text(f".model-option:has({box})")
        assert page.is_checked(f"input[name=models][value='{CIFAR}']")  # preselected
        page.uncheck(f"input[name=models][value='{CIFAR}']")  # the user's choice, to be kept
        assert page.is_checked(f"input[name=models][value='{R18}']")  # preselected, kept
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped.clear()
        assert load.result().status_code == 200
        page.wait_for_selector(f"{box}:enabled", timeout=30_000)  # no reload
        assert "loading" not in page.inner_text(f".model-option:has({box})")
        assert not page.is_checked(f"input[name=models][value='{CIFAR}']")
        assert page.is_checked(f"input[name=models][value='{R18}']")
        assert not page.is_checked(box)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        ex.shutdown(wait=True)
        context.close()
        httpx.post(f"{oip.url}/v2/repository/models/{TARGET}/unload", headers=auth(),
                   timeout=300).raise_for_status()  # fmt: skip


def test_a_cancelled_grpc_call_keeps_its_budget_while_its_message_is_read(oip, monkeypatch):
    """A large ModelInfer is read into tensors on a thread, which a cancelled call (client gone,
    deadline) does not stop: the message's share of IMGCLS_MAX_INFLIGHT_MB stays taken until
    that thread lets go of it, not only until the call ends."""
    import threading

    import grpc

    from app.oip import grpc_server
    from app.oip.generated import grpc_predict_v2_pb2 as pb
    from app.oip.generated import grpc_predict_v2_pb2_grpc as pb_grpc

    budget = oip.app.state.upload_budget
    release, reading = threading.Event(), threading.Event()
    convert = grpc_server.conv.infer_request

    def slow(request, *rest):  # the thread reading the message, held until the test lets it go
        reading.set()
        release.wait(30)
        return convert(request, *rest)

    monkeypatch.setattr(grpc_server.conv, "infer_request", slow)
    pixels = np.zeros((8, 3, 32, 32), dtype=np.float32)  # 98 KB: read off the event loop
    request = pb.ModelInferRequest(model_name=CIFAR)
    t = request.inputs.add(name="PIXELS", datatype="FP32", shape=[8, 3, 32, 32])
    t.contents.fp32_contents.extend(pixels.ravel().tolist())
    assert budget.used == 0
    cancelled = f'imgcls_requests_total{{endpoint="grpc:ModelInfer",model="{CIFAR}",status="499"}} '

    def cancels() -> float:  # counted once the call's handler has ended
        for row in httpx.get(f"{oip.url}/metrics", headers=auth()).text.splitlines():
            if row.startswith(cancelled):
                return float(row[len(cancelled) :])
        return 0.0

    before = cancels()
    with grpc.insecure_channel(f"127.0.0.1:{oip.settings.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer.future(request, metadata=(("authorization", f"Bearer {KEY}"),))
        try:
            assert reading.wait(30), "the message was never read off the loop"
            call.cancel()
            deadline = time.monotonic() + 10
            while not call.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert call.cancelled()
            while cancels() == before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert cancels() == before + 1  # the handler has ended
            assert budget.used >= request.ByteSize()  # the thread still holds the message
        finally:
            release.set()
        deadline = time.monotonic() + 10
        while budget.used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert budget.used == 0


def test_grpc_calls_carry_a_request_id_to_the_client_and_the_access_log(oip):
    """As X-Request-ID over HTTP: a call's id is the client's well-formed x-request-id metadata
    (else a new one), sent back as trailing metadata on every answer and named by the call's
    access-log line, so that a client's failed call can be found in the log."""
    import logging

    import grpc

    from app.oip.generated import grpc_predict_v2_pb2 as pb
    from app.oip.generated import grpc_predict_v2_pb2_grpc as pb_grpc

    lines: list[dict] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(dict(getattr(record, "fields", {})))

    access = logging.getLogger("imgcls.access")
    keep, level = Keep(), access.level
    access.addHandler(keep)
    access.setLevel(logging.INFO)
    key = (("authorization", f"Bearer {KEY}"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{oip.settings.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            ok, call = stub.ModelMetadata.with_call(
                pb.ModelMetadataRequest(name=CIFAR), metadata=(*key, ("x-request-id", "mine-1"))
            )
            assert ok.name == CIFAR and ("x-request-id", "mine-1") in call.trailing_metadata()
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), metadata=key)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            (made,) = [v for k, v in caught.value.trailing_metadata() if k == "x-request-id"]
            with pytest.raises(grpc.RpcError):  # not well formed: replaced by a new one
                stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"),
                                   metadata=(*key, ("x-request-id", "a b")))  # fmt: skip

        def logged() -> list[tuple]:
            return [(line.get("request_id"), line.get("status")) for line in lines
                    if line.get("path") == "/inference.GRPCInferenceService/ModelMetadata"]  # fmt: skip

        # a call's line is written as its handler ends, which can be after its client has the
        # answer
        wait_for(lambda: len(logged()) >= 3, timeout=10)
    finally:
        access.removeHandler(keep)
        access.setLevel(level)
    ids = logged()
    assert ids[:2] == [("mine-1", 200), (made, 404)] and len(made) == 32
    assert ids[2][0] not in (None, "a b") and ids[2][1] == 404


def test_grpc_calls_beyond_the_concurrency_cap_are_refused_at_once(model_dir: Path):
    """IMGCLS_GRPC_MAX_CONCURRENT_RPCS: with 2 calls held (each waits 200 ms for its batch to
    fill), the others of 12 sent at once are refused with RESOURCE_EXHAUSTED before any
    handler runs; the ones served answer, and the server serves again afterwards."""
    import asyncio

    import grpc

    from app.oip.generated import grpc_predict_v2_pb2 as pb
    from app.oip.generated import grpc_predict_v2_pb2_grpc as pb_grpc

    require_shared(CIFAR_WEIGHTS / CIFAR_FILES[CIFAR])
    port = free_port()
    pixels = np.zeros((1, 3, 32, 32), dtype=np.float32).tobytes()
    request = pb.ModelInferRequest(
        model_name=CIFAR,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="PIXELS", datatype="FP32",
                                                      shape=[1, 3, 32, 32])],
        raw_input_contents=[pixels],
    )  # fmt: skip

    async def infer(stub: pb_grpc.GRPCInferenceServiceStub) -> grpc.StatusCode:
        try:
            response = await stub.ModelInfer(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        assert response.outputs[0].name == "PROBABILITIES"
        return grpc.StatusCode.OK

    async def calls(n: int) -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return list(await asyncio.gather(*(infer(stub) for _ in range(n))))

    def burst(n: int) -> list[grpc.StatusCode]:  # an event loop of its own, on a thread of its own
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(calls(n))).result()

    with run_service(
        models=CIFAR, weights_dir=model_dir, grpc_port=port, grpc_host="127.0.0.1",
        grpc_max_concurrent_rpcs=2, max_batch_size=8, max_batch_wait_ms=200,
    ):  # fmt: skip
        codes = burst(12)
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert 1 <= codes.count(grpc.StatusCode.OK) < 12, codes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
        assert burst(1) == [grpc.StatusCode.OK]  # and it serves again


def test_grpc_answers_are_not_capped_by_the_request_limit(tmp_path: Path):
    """IMGCLS_OIP_MAX_REQUEST_MB caps requests, not answers: two tiny PNGs (a request of a few
    hundred bytes under a 5 KB limit) through a 1,000-class model answer 8 KB of probabilities.
    The answer was computed, then refused on its way out (RESOURCE_EXHAUSTED), counted 200."""
    import grpc

    from app.oip.generated import grpc_predict_v2_pb2 as pb
    from app.oip.generated import grpc_predict_v2_pb2_grpc as pb_grpc

    port = free_port()
    png = images.encode(images.photo((8, 8)), "PNG")
    request = pb.ModelInferRequest(
        model_name="resnet18",
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name="IMAGE", datatype="BYTES", shape=[2],
            contents=pb.InferTensorContents(bytes_contents=[png, png]),
        )],
    )  # fmt: skip
    limit_mb = 0.005
    assert request.ByteSize() < limit_mb * 1024 * 1024
    with (
        run_service(
            models="resnet18", allow_random_weights=True, weights_dir=tmp_path,
            grpc_port=port, grpc_host="127.0.0.1", oip_max_request_mb=limit_mb,
        ),
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):  # fmt: skip
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    (output,) = response.outputs
    assert output.name == "PROBABILITIES" and list(output.shape) == [2, 1000]
    assert response.ByteSize() > limit_mb * 1024 * 1024


# ---- gRPC, in a process without imgcls's protobuf names --------------------------------------
def test_grpc_with_tritonclient(oip):
    env = {
        **os.environ,
        "OIP_GRPC": f"127.0.0.1:{oip.settings.grpc_port}",
        "OIP_REST": oip.url,
        "OIP_KEY": KEY,
        "OIP_IMAGES": str(IMAGES),
    }
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/oip_grpc_checks.py", "-q", "-rxs",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 17
    assert not re.search(r"\d+ (failed|xfailed|skipped)", r.stdout)


def test_app_does_not_import_the_stubs():
    """Importing the app leaves tritonclient.grpc importable: the stubs load with the server."""
    code = (
        "import sys, app.main, app.oip.rest, app.oip.dataplane\n"
        "assert not [m for m in sys.modules if m.startswith('app.oip.generated.')], sys.modules\n"
        "import tritonclient.grpc\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# ---- the OpenAPI contract of /v2 -------------------------------------------------------------
# Schemathesis learns model names from the answers (the repository index lists every catalog
# model), so it would load and unload real models under the other tests: those two routes are
# left to the tests above. A catalog model that is not loaded is "not ready": 503, as KServe's
# server answers, which the second run accepts on the readiness routes only.
ST_RUNS = {
    "all-but-repository-control": ["--exclude-path-regex", "^/v2/repository/models/|/ready$"],
    "model-readiness": [
        "--include-path-regex",
        "/ready$",
        "--exclude-checks",
        "not_a_server_error",
    ],
}


@pytest.mark.parametrize("run", list(ST_RUNS))
def test_v2_openapi_contract(oip, tmp_path: Path, run: str):
    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    extra = ST_RUNS[run]
    excluded = ["positive_data_acceptance"]
    if "--exclude-checks" in extra:
        excluded.append(extra[extra.index("--exclude-checks") + 1])
        extra = extra[: extra.index("--exclude-checks")]
    r = subprocess.run(
        [st, "run", f"{oip.url}/openapi.json", "--include-path-regex", "^/v2", *extra,
         "-H", f"Authorization: Bearer {KEY}", "--checks", "all",
         "--exclude-checks", ",".join(excluded), "--max-examples", "30",
         "--workers", "1", "--request-timeout", "60", "--report", "junit",
         "--report-dir", str(tmp_path), "--no-color"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "passed" in r.stdout.lower()


def test_v2_openapi_documents_its_errors_in_the_protocols_form(oip):
    """Every /v2 route documents its client errors in the protocol's form ({"error": ...}),
    the guards' 401/408/431 among them, and no 422 (FastAPI's validation errors are answered
    400 here: the 422 with {"detail": [...]} FastAPI documents could never come)."""
    spec = httpx.get(f"{oip.url}/openapi.json", headers=AUTH).json()
    error = {"$ref": "#/components/schemas/OipError"}
    for path, ops in spec["paths"].items():
        if not path.startswith("/v2"):
            continue
        for method, op in ops.items():
            codes = op["responses"]
            assert "422" not in codes, (path, method)
            for code in ("4XX", "500", *[c for c in codes if c.startswith("4")]):
                if code == "401":
                    continue  # added for the key by app/api/docs.py, in the protocol's form too
                schema = codes[code]["content"]["application/json"]["schema"]
                assert schema == error, (path, method, code, schema)
    r = httpx.get(f"{oip.url}/v2/models/a%20b", headers=AUTH)  # FastAPI's validation: a 400
    assert r.status_code == 400 and list(r.json()) == ["error"], r.text


# ---- KServe deployment, statically -----------------------------------------------------------
def test_kserve_inferenceservice_matches_the_settings():
    from app.main import create_app
    from app.settings import Settings

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kserve-inferenceservice.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["InferenceService", "InferenceService"]
    fields = {f"IMGCLS_{n.upper()}" for n in Settings.model_fields} | {"HOST", "PORT"}
    paths = create_app(Settings(grpc_port=0)).openapi()["paths"]
    for doc in docs:
        assert doc["apiVersion"] == "serving.kserve.io/v1beta1"
        predictor = doc["spec"]["predictor"]
        (container,) = predictor["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        assert {e["name"] for e in container["env"]} <= fields
        settings = Settings(**{k.removeprefix("IMGCLS_").lower(): v for k, v in env.items()
                               if k.startswith("IMGCLS_")})  # fmt: skip
        (port,) = container["ports"]
        if port["name"] == "h2c":  # gRPC
            assert port["containerPort"] == settings.grpc_port and settings.grpc_host == "0.0.0.0"
            # ready when the server is (its port listens while models load): asked over HTTP
            command = container["readinessProbe"]["exec"]["command"]
            url = f"http://{env['HOST']}:{env['PORT']}/v2/health/ready"
            assert command[-1] == url and "/v2/health/ready" in paths
        else:
            assert port["containerPort"] == int(env["PORT"]) and env["HOST"] == "0.0.0.0"
            for probe in ("readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                assert get["port"] == port["containerPort"] and get["path"] in paths
        assert "IMGCLS_API_KEY" not in env  # a key comes from a Secret, not the manifest
