"""gRPC checks with tritonclient.grpc, run by tests/test_oip.py in a subprocess of their own.

tritonclient registers the protocol's protobuf names (``inference.*``) in the default descriptor
pool, and so do imgcls's generated stubs: the two cannot be imported in one process. The server
runs in the parent test process; this module only talks to it, through the addresses in
OIP_GRPC (host:port), OIP_REST (base URL, for /classify) and the key in OIP_KEY. It is not
collected on its own (no ``test_`` prefix).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from tests.rawhttp import connect

ROOT = Path(__file__).resolve().parents[1]
IMAGES = Path(os.environ.get("OIP_IMAGES", ROOT.parent / "shared" / "data" / "images"))
PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png"]
CIFAR = "cifar10_resnet20"
R18 = "resnet18:IMAGENET1K_V1"

pytestmark = pytest.mark.skipif(
    "OIP_GRPC" not in os.environ, reason="run by tests/test_oip.py against its server"
)


@pytest.fixture(scope="module")
def key() -> str:
    return os.environ["OIP_KEY"]


@pytest.fixture(scope="module")
def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client():
    c = tg.InferenceServerClient(os.environ["OIP_GRPC"])
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub():
    """tritonclient's own generated stub, for messages its high-level client does not build
    (typed contents instead of raw_input_contents)."""
    channel = grpc.insecure_channel(os.environ["OIP_GRPC"])
    yield tpb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def photos() -> list[bytes]:
    return [(IMAGES / n).read_bytes() for n in PHOTOS]


def classify_top1(name: str, data: bytes, key: str) -> dict:
    r = httpx.post(
        f"{os.environ['OIP_REST']}/classify",
        params={"model": CIFAR, "top_k": 1},
        files={"file": (name, data)},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def image_input(files: list[bytes]) -> tg.InferInput:
    inp = tg.InferInput("IMAGE", [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array(files, dtype=object))
    return inp


def metric(key: str, name: str, labels: str) -> float:
    """One sample of the service's /metrics (0 if absent), e.g. ``name="imgcls_queue_depth"``,
    ``labels='model="cifar10_resnet20"'``."""
    text = httpx.get(
        f"{os.environ['OIP_REST']}/metrics", headers={"Authorization": f"Bearer {key}"}
    ).text
    line = f"{name}{{{labels}}} "
    for row in text.splitlines():
        if row.startswith(line):
            return float(row[len(line) :])
    return 0.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ---- the .proto kept in the repository is the protocol's ---------------------------------------
def _messages(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    out = {}

    def walk(prefix: str, msgs) -> None:
        for m in msgs:
            out[prefix + m.name] = m
            walk(prefix + m.name + ".", m.nested_type)

    walk("", fd.message_type)
    return out


def test_proto_matches_tritonclients(tmp_path: Path):
    """Every message and call of app/oip/proto has tritonclient's fields, numbers and types."""
    out = tmp_path / "ours.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'app/oip/proto'}",
         f"--descriptor_set_out={out}", "grpc_predict_v2.proto"],
        check=True,
    )  # fmt: skip
    ours = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    theirs = descriptor_pb2.FileDescriptorProto()
    tpb.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    mine, triton = _messages(ours), _messages(theirs)
    assert len(mine) > 25
    for name, msg in mine.items():
        assert name in triton, name
        fields = {(f.name, f.number, f.type, f.label, f.type_name) for f in msg.field}
        assert fields == {
            (f.name, f.number, f.type, f.label, f.type_name) for f in triton[name].field
        }, name
    (service,) = ours.service
    (triton_service,) = theirs.service
    assert service.name == triton_service.name == "GRPCInferenceService"
    calls = {m.name: (m.input_type, m.output_type) for m in triton_service.method}
    for m in service.method:
        assert calls[m.name] == (m.input_type, m.output_type), m.name
    assert {m.name for m in service.method} >= {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
        "ModelStatistics",
    }  # fmt: skip


# ---- health and metadata -----------------------------------------------------------------------
def test_health_is_open_and_the_rest_needs_the_key(client, auth):
    assert client.is_server_live() and client.is_server_ready()  # no key needed
    with pytest.raises(InferenceServerException) as info:
        client.get_server_metadata()
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "authorization" in info.value.message()
    assert client.get_server_metadata(headers=auth).name == "imgcls"


def test_authorization_scheme_in_any_case(client, key):
    """As over HTTP (RFC 9110: the scheme is case-insensitive); the key itself is exact."""
    for scheme in ("bearer", "BEARER", "Bearer"):
        meta = client.get_server_metadata(headers={"authorization": f"{scheme} {key}"})
        assert meta.name == "imgcls", scheme
    refused = 'endpoint="grpc:ServerMetadata",model="",status="401"'
    before = metric(key, "imgcls_requests_total", refused)
    for given in (f"bearer {key.upper()}", f"Basic {key}", key):
        with pytest.raises(InferenceServerException) as info:
            client.get_server_metadata(headers={"authorization": given})
        assert info.value.status() == "StatusCode.UNAUTHENTICATED", given
    # counted (and logged) as HTTP's 401s are
    assert metric(key, "imgcls_requests_total", refused) == before + 3


def test_metadata(client, auth):
    meta = client.get_server_metadata(headers=auth)
    assert {"classification", "binary_tensor_data", "model_repository"} <= set(meta.extensions)
    model = client.get_model_metadata(R18, headers=auth, as_json=True)
    assert model["name"] == R18 and model["versions"] == ["1"]
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in model["inputs"]}
    assert inputs == {"IMAGE": ("BYTES", [-1]), "PIXELS": ("FP32", [-1, 3, 224, 224])}
    (out,) = model["outputs"]
    assert (out["name"], out["datatype"], [int(d) for d in out["shape"]]) == (
        "PROBABILITIES", "FP32", [-1, 1000],
    )  # fmt: skip
    assert client.is_model_ready(CIFAR, headers=auth)
    assert client.is_model_ready(R18, "1", headers=auth)
    assert not client.is_model_ready("vgg16", headers=auth)  # in the catalog, not loaded


# ---- inference ---------------------------------------------------------------------------------
def test_image_batch_top1_matches_classify(client, auth, key):
    files = photos()
    out = tg.InferRequestedOutput("PROBABILITIES", class_count=5)
    res = client.infer(CIFAR, [image_input(files)], outputs=[out], headers=auth, request_id="r1")
    top = res.as_numpy("PROBABILITIES")
    assert top.shape == (3, 5)
    assert res.get_response().id == "r1"
    for row, name, data in zip(top, PHOTOS, files, strict=True):
        score, index, label = row[0].decode().split(":", 2)
        expected = classify_top1(name, data, key)
        assert (int(index), label) == (expected["index"], expected["label"])
        assert float(score) == pytest.approx(expected["score"], abs=1e-5)


def test_bytes_contents_and_fp32_contents(stub, client, auth):
    """The same answers whether the data comes in typed contents or raw_input_contents."""
    files = photos()
    raw = client.infer(CIFAR, [image_input(files)], headers=auth).as_numpy("PROBABILITIES")
    request = tpb.ModelInferRequest(model_name=CIFAR)
    t = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[3])
    t.contents.bytes_contents.extend(files)
    answer = stub.ModelInfer(request, metadata=tuple(auth.items()))
    assert answer.outputs[0].shape == [3, 10]
    probs = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(3, 10)
    np.testing.assert_allclose(probs, raw, atol=1e-5)
    # PIXELS as fp32_contents: grey images, preprocessed by hand (value 0 after normalisation)
    request = tpb.ModelInferRequest(model_name=CIFAR)
    t = request.inputs.add(name="PIXELS", datatype="FP32", shape=[2, 3, 32, 32])
    t.contents.fp32_contents.extend([0.0] * (2 * 3 * 32 * 32))
    answer = stub.ModelInfer(request, metadata=tuple(auth.items()))
    probs = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-6)
    assert probs.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_messages(client, auth, algorithm):
    """tritonclient.grpc's compression_algorithm: gRPC decompresses the message (within the
    message limit) and the answers are the plain call's."""
    files = photos()
    plain = client.infer(CIFAR, [image_input(files)], headers=auth).as_numpy("PROBABILITIES")
    packed = client.infer(
        CIFAR, [image_input(files)], headers=auth, compression_algorithm=algorithm
    ).as_numpy("PROBABILITIES")
    np.testing.assert_array_equal(packed, plain)


def test_statistics(client, auth):
    """ModelStatistics (tritonclient's get_inference_statistics) counts what ModelInfer ran, as
    the REST extension does (tests/test_oip.py checks the numbers in detail)."""
    files = photos()

    def stats(name: str = CIFAR):
        return client.get_inference_statistics(name, headers=auth).model_stats

    (before,) = stats()
    client.infer(CIFAR, [image_input(files)], headers=auth)
    (after,) = stats()
    assert after.name == CIFAR and after.version == "1"
    assert after.inference_count - before.inference_count == 3
    done = after.inference_stats.success.count - before.inference_stats.success.count
    assert done == 3 and after.inference_stats.compute_infer.ns > 0
    assert sum(b.batch_size * b.compute_infer.count for b in after.batch_stats) == (
        after.inference_count
    )
    assert {m.name for m in stats("")} >= {CIFAR, R18}  # no name: every loaded model
    with pytest.raises(InferenceServerException) as info:
        stats("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_pixels_raw_match_image(client, auth):
    sys.path.insert(0, str(ROOT))
    from app.catalog import build_catalog  # the catalog only: no protobuf names
    from app.engine.decoding import decode_pixels
    from app.preprocess import normalize

    spec = build_catalog().get(CIFAR)
    files = photos()
    pre = spec.transform  # decoded and resized as the server does (IMGCLS_JPEG_DRAFT=1)
    pixels = [decode_pixels(f, 10**8, {0: pre}, draft=True)[0][0] for f in files]
    x = np.stack([normalize(p, pre.mean, pre.std).numpy() for p in pixels])
    inp = tg.InferInput("PIXELS", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    probs = client.infer(CIFAR, [inp], headers=auth).as_numpy("PROBABILITIES")
    ref = client.infer(CIFAR, [image_input(files)], headers=auth).as_numpy("PROBABILITIES")
    np.testing.assert_allclose(probs, ref, atol=1e-5)


# ---- errors ------------------------------------------------------------------------------------
def test_error_codes(stub, auth):
    md = tuple(auth.items())

    def infer(model: str, name: str, datatype: str, shape: list[int], payload: list[bytes]):
        request = tpb.ModelInferRequest(model_name=model)
        t = request.inputs.add(name=name, datatype=datatype, shape=shape)
        t.contents.bytes_contents.extend(payload)
        return lambda: stub.ModelInfer(request, metadata=md)

    good = photos()[0]
    assert status_of(infer("nope", "IMAGE", "BYTES", [1], [good])) == grpc.StatusCode.NOT_FOUND
    assert (
        status_of(infer(CIFAR, "INPUT0", "BYTES", [1], [good])) == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        status_of(infer(CIFAR, "IMAGE", "BYTES", [1, 1], [good]))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        status_of(infer(CIFAR, "IMAGE", "BYTES", [2], [good])) == grpc.StatusCode.INVALID_ARGUMENT
    )
    with pytest.raises(grpc.RpcError) as info:
        infer(CIFAR, "IMAGE", "BYTES", [2], [good, b"not an image"])()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("IMAGE[1]:")
    request = tpb.ModelInferRequest(model_name=CIFAR)
    request.inputs.add(name="IMAGE", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    assert (
        status_of(lambda: stub.ModelInfer(request, metadata=md)) == grpc.StatusCode.INVALID_ARGUMENT
    )
    # a model input of another datatype is told its own first
    request = tpb.ModelInferRequest(model_name=CIFAR)
    request.inputs.add(name="PIXELS", datatype="UINT8", shape=[4]).contents.uint_contents.extend(
        [1, 2, 3, 4]
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "PIXELS must be FP32, got UINT8"
    # an input no model takes is refused as such before its contents are read, whatever its
    # size (it was counted against the queue first: 413 for a large one)
    for shape in ([4], [2**40]):
        request = tpb.ModelInferRequest(model_name=CIFAR)
        t = request.inputs.add(name="EXTRA", datatype="UINT8", shape=shape)
        t.contents.uint_contents.extend([1, 2, 300, 4])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, metadata=md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("unknown input 'EXTRA'"), info.value.details()
    # typed contents: counted against the shape before any is read
    request = tpb.ModelInferRequest(model_name=CIFAR)
    t = request.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 3, 32, 32])
    t.contents.fp32_contents.extend([0.0] * 3073)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=md)
    assert "holds 3072 elements but the data has 3073" in info.value.details()
    # raw BYTES: millions of images declared are refused from the shape, before the data is read
    request = tpb.ModelInferRequest(model_name=CIFAR)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[4_000_000])
    request.raw_input_contents.append(b"\0" * 8)  # two empty elements
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4000000 images is more than" in info.value.details(), info.value.details()
    # what the client sent is quoted cut short (a 20 KB quote overflows grpc's metadata limit
    # and comes back RESOURCE_EXHAUSTED), and the fields REST's schema bounds are bounded here
    long = "x" * 20_000
    for call in (
        infer(CIFAR, long[:200], "BYTES", [1], [good]),  # within the limit, quoted cut
        infer(CIFAR, "IMAGE", long[:1000], [1], [good]),
        infer(long[:200], "IMAGE", "BYTES", [1], [good]),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert "x" * 121 not in info.value.details(), info.value.details()[:300]
    for field in ("id", "model_version"):
        request = infer_ok(good)
        setattr(request, field, long)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, metadata=md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{field} is 20,000 characters long; at most" in info.value.details()
    request = infer_ok(good)
    request.inputs[0].name = long
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "an input's name is 20,000 characters long" in info.value.details()
    # no input, or one twice: told which (both were "send one input: ... not both")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(tpb.ModelInferRequest(model_name=CIFAR), metadata=md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("no input"), info.value.details()
    request = infer_ok(good)
    request.inputs.append(request.inputs[0])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=md)
    assert info.value.details() == "input 'IMAGE' appears more than once; send it once"
    # every call that takes a model's name or version bounds them as REST does (128): refused
    # as malformed, as REST's 400, not looked up (NOT_FOUND)
    name = "a" * 200
    for call in (
        lambda: stub.ModelMetadata(tpb.ModelMetadataRequest(name=name), metadata=md),
        lambda: stub.ModelReady(tpb.ModelReadyRequest(name=CIFAR, version=name), metadata=md),
        lambda: stub.ModelStatistics(tpb.ModelStatisticsRequest(name=name), metadata=md),
        lambda: stub.RepositoryModelLoad(
            tpb.RepositoryModelLoadRequest(model_name=name), metadata=md
        ),
        lambda: stub.RepositoryModelUnload(
            tpb.RepositoryModelUnloadRequest(model_name=name), metadata=md
        ),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "is 200 characters long; at most 128" in info.value.details()
    meta = tpb.ModelMetadataRequest(name="nope")
    assert status_of(lambda: stub.ModelMetadata(meta, metadata=md)) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: stub.ModelMetadata(meta)) == grpc.StatusCode.UNAUTHENTICATED
    # and the model still serves
    assert stub.ModelInfer(infer_ok(good), metadata=md).outputs[0].shape == [1, 10]


def test_model_infer_takes_its_share_of_the_upload_budget(stub, auth, key):
    """A ModelInfer message counts against IMGCLS_MAX_INFLIGHT_MB (8 MB for this server) with
    the HTTP door's bodies: while a 7 MB /v2 body is on its way, a 1.5 MB message is refused
    with UNAVAILABLE and retry-after; once that client is gone, the same message is served
    (here: refused for its content, not for its size)."""
    md = tuple(auth.items())
    request = tpb.ModelInferRequest(model_name=CIFAR)
    t = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(b"\x00" * (3 * 1024 * 1024 // 2))  # not an image
    errors: list[grpc.RpcError] = []

    def refused(want: bool) -> bool:
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, metadata=md, timeout=60)
        errors.append(info.value)
        return (info.value.code() == grpc.StatusCode.UNAVAILABLE) == want

    holder = connect(os.environ["OIP_REST"])
    try:  # the headers of a 7 MB body: reserved from the budget, the body never comes
        holder.sendall(
            f"POST /v2/models/{CIFAR}/infer HTTP/1.1\r\nHost: t\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {7 * 1024 * 1024}\r\n\r\n".encode()
        )
        wait_for(lambda: refused(True), "ModelInfer refused while the budget is held", 5)
    finally:
        holder.close()
    over = errors[-1]
    assert "IMGCLS_MAX_INFLIGHT_MB" in over.details()
    assert dict(over.trailing_metadata() or ()).get("retry-after") == "1"
    wait_for(lambda: refused(False), "ModelInfer served once the budget is free")
    assert errors[-1].code() == grpc.StatusCode.INVALID_ARGUMENT, errors[-1].details()


def test_cancelled_call_is_counted_499(stub, auth, key):
    """A call the client cancels while its images wait for the worker is a 499 in the request
    metric, not a 200. The worker is kept busy by a ResNet-18 call (16 images, both of its
    batch slots), so the CIFAR call's images wait in their queue, where the test sees them
    before it cancels; a try where the CIFAR call was served first is done again."""
    md = tuple(auth.items())
    small = (IMAGES / "horse.png").read_bytes()  # the messages stay well within the budget
    busy = tpb.ModelInferRequest(model_name=R18)
    busy.inputs.add(name="IMAGE", datatype="BYTES", shape=[16]).contents.bytes_contents.extend(
        [small] * 16
    )
    request = tpb.ModelInferRequest(model_name=CIFAR)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[8]).contents.bytes_contents.extend(
        [small] * 8
    )
    queued = f'model="{CIFAR}"'
    cancelled = f'endpoint="grpc:ModelInfer",model="{CIFAR}",status="499"'
    before = metric(key, "imgcls_requests_total", cancelled)
    for _ in range(5):
        hold = stub.ModelInfer.future(busy, metadata=md, timeout=120)
        call = stub.ModelInfer.future(request, metadata=md, timeout=120)
        wait_for(
            lambda call=call: call.done() or metric(key, "imgcls_queue_depth", queued) > 0,
            "the CIFAR call's images queued, or the call answered",
        )
        caught = not call.done() and call.cancel()
        hold.result()
        if caught:
            break
    assert caught, "the CIFAR call was never seen waiting in its queue"
    wait_for(
        lambda: metric(key, "imgcls_requests_total", cancelled) == before + 1,
        "the cancelled call counted as 499",
    )


def infer_ok(data: bytes) -> tpb.ModelInferRequest:
    request = tpb.ModelInferRequest(model_name=CIFAR)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        data
    )
    return request


# ---- model repository --------------------------------------------------------------------------
def test_repository(client, auth):
    index = {m.name: m for m in client.get_model_repository_index(headers=auth).models}
    assert index[CIFAR].state == "READY" and index[R18].state == "READY"
    assert index["vgg16"].state == "UNAVAILABLE" and index["vgg16"].reason
    client.load_model(CIFAR, headers=auth)  # already loaded: ready at once
    with pytest.raises(InferenceServerException) as info:
        client.load_model("nope", headers=auth)
    assert info.value.status() == "StatusCode.NOT_FOUND"


TARGET = "cifar10_resnet32"  # in the catalog, not started with the server


def state(client, auth, name: str) -> str:
    return {m.name: m.state for m in client.get_model_repository_index(headers=auth).models}[name]


def test_load_infer_unload_infer(client, auth, key):
    assert state(client, auth, TARGET) == "UNAVAILABLE"
    assert not client.is_model_ready(TARGET, headers=auth)
    client.load_model(TARGET, headers=auth)  # returns once the workers have it ready
    assert state(client, auth, TARGET) == "READY"
    assert client.is_model_ready(TARGET, headers=auth)
    listed = httpx.get(
        f"{os.environ['OIP_REST']}/info", headers={"Authorization": f"Bearer {key}"}
    ).json()["models"]
    assert TARGET in listed
    probs = client.infer(TARGET, [image_input(photos())], headers=auth).as_numpy("PROBABILITIES")
    assert probs.shape == (3, 10) and probs.sum(axis=1) == pytest.approx([1.0] * 3, abs=1e-4)
    client.unload_model(TARGET, headers=auth)  # returns once drained and freed
    # counted under the model it unloaded (served when the call came), as over HTTP
    metrics = httpx.get(
        f"{os.environ['OIP_REST']}/metrics", headers={"Authorization": f"Bearer {key}"}
    ).text
    unloads = (
        f'imgcls_requests_total{{endpoint="grpc:RepositoryModelUnload",model="{TARGET}",'
        'status="200"}'
    )
    assert unloads in metrics, [x for x in metrics.splitlines() if "Unload" in x]
    assert state(client, auth, TARGET) == "UNAVAILABLE"
    assert not client.is_model_ready(TARGET, headers=auth)
    with pytest.raises(InferenceServerException) as info:
        client.infer(TARGET, [image_input(photos()[:1])], headers=auth)
    assert info.value.status() == "StatusCode.NOT_FOUND" and "not loaded" in info.value.message()


def test_repository_calls_need_the_key(stub, client, auth):
    wrong = (("authorization", "Bearer wrong"),)
    for call in (
        lambda md: stub.RepositoryIndex(tpb.RepositoryIndexRequest(), metadata=md),
        lambda md: stub.RepositoryModelLoad(
            tpb.RepositoryModelLoadRequest(model_name=TARGET), metadata=md
        ),
        lambda md: stub.RepositoryModelUnload(
            tpb.RepositoryModelUnloadRequest(model_name=CIFAR), metadata=md
        ),
    ):
        for md in ((), wrong):
            assert status_of(functools.partial(call, md)) == grpc.StatusCode.UNAUTHENTICATED
    assert state(client, auth, TARGET) == "UNAVAILABLE" and state(client, auth, CIFAR) == "READY"


def test_calls_are_counted_like_http_requests(client, auth, key):
    client.infer(CIFAR, [image_input(photos()[:1])], headers=auth)
    with pytest.raises(InferenceServerException):
        client.infer("nope", [image_input(photos()[:1])], headers=auth)
    metrics = httpx.get(
        f"{os.environ['OIP_REST']}/metrics", headers={"Authorization": f"Bearer {key}"}
    ).text
    assert (
        f'imgcls_requests_total{{endpoint="grpc:ModelInfer",model="{CIFAR}",status="200"}}'
        in metrics
    )
    assert (
        'imgcls_requests_total{endpoint="grpc:ModelInfer",model="unknown",status="404"}' in metrics
    )
