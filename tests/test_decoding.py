"""Where uploads are decoded: in the worker (the default) or in the API process.

- Both give the same answers for the same upload, and the same 4xx for the hostile corpus.
- In the worker, an upload that cannot be decoded fails alone; its batch-mates are answered.
- The tensor decoder (torchvision.io + tensor resize: what a CUDA worker runs with nvjpeg) is
  held to the Pillow path on real images, here on the CPU, in tests/test_gpu.py on the GPU.
- A worker times it against Pillow per upload size and sends each plain JPEG to the faster; on
  the CPU only where it gives Pillow's very pixels (issue 12).
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from app import imaging
from app.catalog import build_catalog
from app.engine.batcher import ImageResult, ModelBatcher
from app.engine.decoding import (
    DECODE_SIZES,
    Decoder,
    Encoded,
    _status,
    _Whole,
    decode_pixels,
    draft_side,
)
from app.engine.observer import NullObserver
from app.engine.worker import Runner, WorkerConfig
from app.evaluate import list_images
from tests import guard, images
from tests.conftest import (
    CIFAR_FILES,
    CIFAR_SAMPLE,
    CIFAR_WEIGHTS,
    IMAGES,
    needs_shared,
    ready_pool,
    run_service,
)
from tests.test_errors import HOSTILE

MODEL = "cifar10_resnet20"
# torch's uint8 resize kernels (AVX2/AVX-512): without them the CPU takes no tensor decoder
cpu_tensor_decoder = pytest.mark.skipif(
    not build_catalog().get("resnet50").transform.tensor_resize,
    reason="no AVX2: a CPU worker sends every upload to Pillow",
)


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    return images.encode(img.convert("RGB"), "JPEG", quality=quality)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("w")
    (d / CIFAR_FILES[MODEL]).symlink_to(CIFAR_WEIGHTS / CIFAR_FILES[MODEL])
    return d


@pytest.fixture(scope="module")
def api_decoding(weights_dir):
    with run_service(models=MODEL, weights_dir=weights_dir, decode="api") as svc:
        yield svc


def _classify(url: str, data: bytes, name: str = "x.jpg"):
    import httpx

    return httpx.post(f"{url}/classify", params={"model": MODEL, "top_k": 10},
                      files={"file": (name, data)}, timeout=60)  # fmt: skip


@needs_shared(CIFAR_WEIGHTS / CIFAR_FILES[MODEL], IMAGES)
def test_worker_and_api_decoding_give_the_same_answers(service, api_decoding):
    assert service.service.decode_in_worker and not api_decoding.service.decode_in_worker
    uploads = [p.read_bytes() for p in sorted(IMAGES.iterdir()) if p.suffix in (".png", ".jpg")]
    uploads += [images.exif_rotated(6), images.encode(images.photo().convert("CMYK"), "JPEG")]
    for data in uploads:
        a, b = _classify(service.url, data), _classify(api_decoding.url, data)
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        pa, pb = a.json()["predictions"], b.json()["predictions"]
        assert [p["index"] for p in pa] == [p["index"] for p in pb]
        assert [p["score"] for p in pa] == pytest.approx([p["score"] for p in pb], abs=1e-6)
        assert a.json()["latency_ms"]["decode"] > 0  # measured in the worker


@needs_shared(CIFAR_WEIGHTS / CIFAR_FILES[MODEL])
@pytest.mark.parametrize("where", ["worker", "api"])
def test_hostile_corpus_same_4xx_in_both_places(service, api_decoding, where):
    svc = service if where == "worker" else api_decoding
    workers = svc.service.pool.workers
    pids = [w.pid for w in workers]
    for name, (status, data) in HOSTILE.items():
        r = _classify(svc.url, data, "upload.jpg")
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        assert r.json()["detail"], name
    assert [w.pid for w in workers] == pids and all(w.alive for w in workers)


def test_undecodable_upload_fails_alone_in_its_batch():
    """Uploads whose header passes but whose data is corrupt fail in the worker, alone: the
    rest of their batch is answered, and the worker lives on."""
    good = [_jpeg(images.photo((64 + i, 48))) for i in range(4)]
    whole = _jpeg(images.photo((300, 300)), quality=90)
    bad = [whole[: len(whole) // 2], whole[: len(whole) // 4]]  # truncated, header intact
    for data in bad:
        imaging.probe(data, 10**8)  # passes the API's header check
    spec = build_catalog().get("cifar10_plain20")
    cfg = WorkerConfig(0, "cpu", "fp32", False, False, 1, 8, [spec.load_plan(None)])

    async def scenario() -> None:
        async with ready_pool([cfg], spec.name) as pool:
            batcher = ModelBatcher(spec.name, pool, max_batch_size=8, max_wait_s=0.2, max_queue=16)
            pid = pool.workers[0].pid
            # all six are queued before the batcher runs: one batch
            futures = [batcher.submit(Encoded(d, True), time.monotonic() + 60) for d in good + bad]
            batcher.start()
            try:
                results = await asyncio.gather(*futures, return_exceptions=True)
            finally:
                await batcher.stop()
            for r in results[4:]:
                assert isinstance(r, imaging.ImageError) and "cannot be decoded" in str(r), r
            for r in results[:4]:
                assert isinstance(r, ImageResult), r
                assert r.batch_size == 4 and r.probs.shape == (10,) and r.decode_ms
            assert pool.workers[0].alive and pool.workers[0].pid == pid

    asyncio.run(scenario())


def test_a_batch_of_only_undecodable_uploads_is_not_counted_as_run():
    """A batch whose uploads all fail to decode in the worker runs no forward pass: it is not
    counted as one (imgcls_batch_size, imgcls_inference_latency_seconds), which zero-size,
    near-zero-time batches from bad files used to drag down."""
    whole = _jpeg(images.photo((300, 300)), quality=90)
    bad = [whole[: len(whole) // 2], whole[: len(whole) // 3]]
    spec = build_catalog().get("cifar10_plain20")
    cfg = WorkerConfig(0, "cpu", "fp32", False, False, 1, 8, [spec.load_plan(None)])
    ran: list[int] = []

    class Observer(NullObserver):
        def batch_ran(self, model: str, images: int, inference_s: float, waits_s: list) -> None:
            ran.append(images)

    async def scenario() -> None:
        async with ready_pool([cfg], spec.name) as pool:
            batcher = ModelBatcher(spec.name, pool, max_batch_size=8, max_wait_s=0.2,
                                   max_queue=16, observer=Observer())  # fmt: skip
            futures = [batcher.submit(Encoded(d, True), time.monotonic() + 60) for d in bad]
            batcher.start()
            try:
                results = await asyncio.gather(*futures, return_exceptions=True)
                assert all(isinstance(r, imaging.ImageError) for r in results), results
                good = batcher.submit(Encoded(_jpeg(images.photo((64, 48))), True),
                                      time.monotonic() + 60)  # fmt: skip
                assert (await good).batch_size == 1
            finally:
                await batcher.stop()
        assert ran == [1]  # the good upload's batch alone

    asyncio.run(scenario())


def test_worker_resizes_with_torch_on_its_own_thread_not_the_decode_pool():
    """With the fast path, the worker's decode threads only decode an image torch will resize:
    torch's kernels run on OpenMP threads, and a team started by a pool thread spun beside the
    model's and slowed the next forward pass (resnet50 at one client: 41 -> 48 ms). The batch
    gives the pixels ``decode_pixels`` gives; a partial last block is resized by Pillow on the
    pool's thread, from its region, as before."""
    pre = build_catalog().get("resnet50").transform
    decoder = Decoder(threads=2, max_pixels=10**8, device="cpu", jpeg_on_device=False, draft=True)
    whole = _jpeg(images.photo((500, 375)), quality=90)  # full size: torch's resize
    partial = _jpeg(images.photo((3999, 2999)), quality=90)  # drafted to 1/4: 999.75 x 749.75
    out, _, _ = decoder._pillow(whole, pre)
    assert isinstance(out, Image.Image)  # decoded only, on the pool's thread
    out, _, _ = decoder._pillow(partial, pre)
    assert isinstance(out, torch.Tensor)  # resized by Pillow there
    prepared = decoder.prepare([Encoded(whole, True), Encoded(partial, True)], pre)
    assert prepared.rows == [0, 1] and not prepared.errors and prepared.batch is not None
    for row, data in enumerate((whole, partial)):
        expected, _, _ = decode_pixels(data, 10**8, {0: pre}, draft=True)
        assert torch.equal(prepared.batch[row], expected[0])
    assert all(ms > 0 for ms in prepared.preprocess_ms)


def _tensor_decoder(device: str = "cpu") -> Decoder:
    """A decoder whose plain JPEGs go to the tensor decoder: nvjpeg on CUDA; on the CPU,
    torchvision's, which needs draft decoding on and takes the sizes Pillow would not draft."""
    return Decoder(threads=2, max_pixels=10**8, device=device, jpeg_on_device=True, draft=True)


def _plain(data: bytes) -> Encoded:
    """An upload as the API hands it over: with its header's size and kind."""
    probe = imaging.probe(data, 10**8)
    return Encoded(data, probe.plain_jpeg, (probe.width, probe.height), probe.progressive)


@cpu_tensor_decoder
@needs_shared(IMAGES)
def test_tensor_decoder_pixels_close_to_pillow():
    """torchvision.io decode + antialiased tensor resize vs Pillow, on the real photos."""
    spec = build_catalog().get("resnet18")
    photos = [Image.open(p).convert("RGB") for p in sorted(IMAGES.iterdir())
              if p.suffix in (".png", ".jpg")]  # fmt: skip
    uploads = [_jpeg(p) for p in photos]
    pillow = Decoder(threads=2, max_pixels=10**8, device="cpu", jpeg_on_device=False)
    a = pillow.prepare([Encoded(u, True) for u in uploads], spec.transform)
    tensor = _tensor_decoder()
    assert all(tensor.tensor_eligible(_plain(u), spec.transform) for u in uploads)
    b = tensor.prepare([_plain(u) for u in uploads], spec.transform, on_device=True)
    assert a.batch is not None and b.batch is not None and a.rows == b.rows
    diff = (a.batch.float() - b.batch.float()).abs()
    print(f"tensor vs Pillow pixels: mean |diff| {diff.mean():.3f}, p99 {diff.quantile(0.99):.1f}")
    assert diff.mean() < 1.5 and diff.quantile(0.99) < 12


@cpu_tensor_decoder
def test_tensor_decoder_falls_back_to_pillow_and_reports_errors():
    spec = build_catalog().get(MODEL)
    good = _jpeg(images.photo((80, 60)))
    corrupt = good[:200]  # declared a plain JPEG, but truncated
    png = images.encode(images.photo(), "PNG")
    decoder = _tensor_decoder()
    items = [_plain(good), Encoded(corrupt, True, (80, 60)), _plain(png)]
    assert [decoder.tensor_eligible(e, spec.transform) for e in items] == [True, True, False]
    out = decoder.prepare(
        [*items, spec.transform.pixels(images.photo())], spec.transform, on_device=True
    )
    assert out.rows == [0, 2, 3] and set(out.errors) == {1}
    assert out.errors[1][0] == 400
    assert out.batch is not None and out.batch.shape == (3, 3, 32, 32)
    assert out.batch.dtype == torch.uint8


def tensor_decode_guard(device: str) -> str:
    """The real CIFAR-10 ResNet on the real test sample, upscaled to 128 px JPEGs, decoded and
    resized by Pillow and by the tensor decoder on ``device``, held to tests/guard.py."""
    spec = build_catalog().get(MODEL)
    items = list_images(CIFAR_SAMPLE)
    uploads = []
    for p, _ in items:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize((128, 128), Image.BICUBIC).save(buf, "JPEG", quality=95)
        uploads.append(_plain(buf.getvalue()))
    y = np.array([spec.labels.index(label) for _, label in items])
    runner = Runner(WorkerConfig(0, device, "fp32", False, False, 2, 100, []))
    runner.load(spec.load_plan(str(CIFAR_WEIGHTS / CIFAR_FILES[MODEL])))
    pillow = Decoder(threads=2, max_pixels=10**8, device=device, jpeg_on_device=False)
    tensor = _tensor_decoder(device)
    assert all(tensor.tensor_eligible(u, spec.transform) for u in uploads)
    top1 = {}
    for name, dec in (("pillow", pillow), ("tensor", tensor)):
        preds = []
        for i in range(0, len(uploads), 100):
            prepared = dec.prepare(uploads[i : i + 100], spec.transform, on_device=name == "tensor")
            assert prepared.batch is not None and not prepared.errors
            assert prepared.batch.device.type == torch.device(device).type
            preds.append(runner.forward(MODEL, prepared.batch).argmax(1))
        top1[name] = torch.cat(preds).numpy()
    return guard.check(f"tensor decode on {device}", top1["tensor"], top1["pillow"], y)


@cpu_tensor_decoder
def test_tensor_decoder_on_the_hostile_corpus():
    """Everything from the hostile corpus that passes the header check, sent down the tensor
    (nvjpeg) path as if it were a plain JPEG: each fails alone with a 4xx or decodes; the
    process lives on and the next batch decodes (tests/test_gpu.py: the same through nvjpeg)."""
    tensor_decoder_hostile_corpus("cpu")


def tensor_decoder_hostile_corpus(device: str) -> list[str]:
    """Returns the cases the tensor decoder decoded where Pillow refuses them (nvjpeg may; the
    CPU's decoder hands every refusal to Pillow, so there none may)."""
    spec = build_catalog().get(MODEL)
    passing: list[tuple[str, int, bytes]] = []
    for name, (status, data) in HOSTILE.items():
        try:
            imaging.probe(data, 10**8)
        except (imaging.ImageError, imaging.ImageTooLargeError):
            continue
        passing.append((name, status, data))
    assert passing, "no case of the hostile corpus passes the header check: nothing tested"
    decoder = _tensor_decoder(device)
    decoded: list[str] = []
    # one by one: on the CPU through torchvision's decoder as the pool's threads call it; on
    # CUDA as a worker's batch of one, through nvjpeg (Pillow for what it refuses)
    for name, status, data in passing:
        if device == "cpu":
            try:
                decoder._torchvision(data, spec.transform)
            except Exception as exc:
                assert _status(exc)[0] == status, (name, _status(exc))
            else:
                pytest.fail(f"{name}: decoded, where the service answers {status}")
            continue
        one = decoder.prepare([Encoded(data, True)], spec.transform, on_device=True)
        if one.errors:
            assert one.errors[0][0] == status, (name, one.errors[0])
        else:
            assert one.rows == [0] and one.batch is not None, name
            decoded.append(name)
    # ... and together through nvjpeg's batch path (the same code on the CPU)
    tensor, _, _ = decoder._tensor_jpegs([data for _, _, data in passing], spec.transform)
    leftover = [i for i, px in enumerate(tensor) if px is None]
    out = Decoder(2, 10**8, device, False).prepare(
        [Encoded(passing[i][2], True) for i in leftover], spec.transform
    )  # what nvjpeg refused goes to Pillow: each fails alone with its 4xx, or decodes
    assert len(out.rows) + len(out.errors) == len(leftover)
    for j, (status, _) in out.errors.items():
        assert status == passing[leftover[j]][1], (passing[leftover[j]][0], status)
    good = decoder.prepare([_plain(_jpeg(images.photo()))], spec.transform)
    assert good.rows == [0] and not good.errors and good.batch is not None
    assert good.batch.device.type == torch.device(device).type
    return decoded


@cpu_tensor_decoder
@needs_shared(CIFAR_WEIGHTS / CIFAR_FILES[MODEL], CIFAR_SAMPLE)
def test_tensor_decode_accuracy_guard():
    """The guard of tests/guard.py against Pillow (torchvision.io on the CPU here;
    tests/test_gpu.py runs the same guard with nvjpeg)."""
    tensor_decode_guard("cpu")


@cpu_tensor_decoder
def test_cpu_worker_times_its_jpeg_decoders_per_size():
    """Issue 12: a worker times the tensor decoder against Pillow per upload size and sends each
    plain JPEG to the faster at the nearest size timed. On the CPU, torchvision's decoder may
    only take sizes where it gives the pixels Pillow's path gives (no reduced-scale decode): for
    resnet50, the ImageNet-size and 2-megapixel samples are timed; phone photos stay with
    Pillow, which decodes them at 1/4 scale."""
    pre = build_catalog().get("resnet50").transform
    decoder = _tensor_decoder()
    report = decoder.pick_by_size(pre, batch=2, repeats=1)
    threshold = 2 * draft_side({0: pre})
    timed = [f"{w}x{h}" for w, h in DECODE_SIZES if min(w, h) < threshold]
    assert list(report) == timed == ["500x375", "1600x1200"]
    for pick in report.values():
        ms = cast(dict[str, float], pick["ms_per_image"])
        assert set(ms) == {"torchvision", "pillow"} and all(v > 0 for v in ms.values())
        assert pick["decoder"] == min(ms, key=lambda k: ms[k])
    assert decoder.pick_by_size(pre, batch=2) is report  # once per transform geometry

    small, phone = (
        _plain(_jpeg(images.photo((500, 375)))),
        _plain(_jpeg(images.photo((3000, 2000)))),
    )
    assert isinstance(decoder._torchvision(small.data, pre)[0], _Whole)  # it decodes, no fallback
    assert min(phone.size) >= threshold and not decoder._on_device(phone, pre)
    assert decoder._on_device(small, pre) == (report["500x375"]["decoder"] == "torchvision")
    out = decoder.prepare([small, phone], pre)  # whichever decodes: Pillow's path's pixels
    assert out.batch is not None and out.rows == [0, 1]
    for row, e in enumerate((small, phone)):
        expected, _, _ = decode_pixels(e.data, 10**8, {0: pre}, draft=True)
        assert torch.equal(out.batch[row], expected[0])
    forced = decoder.prepare([small], pre, on_device=True)
    assert forced.batch is not None and torch.equal(forced.batch[0], out.batch[0])


@cpu_tensor_decoder
def test_progressive_jpegs_stay_with_pillow_on_the_cpu():
    """A progressive JPEG can hold any number of scans, and only Pillow's path enforces the
    decode budget: on the CPU it never goes to torchvision's decoder."""
    pre = build_catalog().get("resnet50").transform
    progressive = _plain(images.encode(images.photo((500, 375)), "JPEG", progressive=True))
    baseline = _plain(_jpeg(images.photo((500, 375))))
    assert progressive.plain_jpeg and progressive.progressive and not baseline.progressive
    decoder = _tensor_decoder()
    assert not decoder.tensor_eligible(progressive, pre)
    assert decoder.tensor_eligible(baseline, pre)
    # without draft decoding (the exact path), Pillow resizes: no tensor decoder on the CPU
    exact = Decoder(threads=2, max_pixels=10**8, device="cpu", jpeg_on_device=True, draft=False)
    assert not exact.tensor_eligible(baseline, pre)


@cpu_tensor_decoder
def test_decode_and_resize_on_one_intra_op_thread_then_the_models_count(monkeypatch):
    """On a CPU worker, torch's resizes (of Pillow's decodes and of torchvision's) run on one
    intra-op thread while the pool decodes (a team of OpenMP threads would compete with the
    decoding threads), and the model's own thread count is back for its forward pass."""
    from app.preprocess import Preprocess

    pre = build_catalog().get("resnet50").transform
    seen: list[int] = []
    real = Preprocess.pixels_from_tensor

    def spy(self: Preprocess, *args: Any, **kw: Any) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real(self, *args, **kw)

    monkeypatch.setattr(Preprocess, "pixels_from_tensor", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        decoder = _tensor_decoder()
        upload = _plain(_jpeg(images.photo((500, 375))))
        for on_device in (False, True):  # Pillow's decode, then torchvision's
            seen.clear()
            out = decoder.prepare([upload] * 2, pre, on_device=on_device)
            assert out.rows == [0, 1] and seen == [1, 1]
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_encoded_crosses_to_the_worker_with_its_size_and_kind():
    """What routes an upload in the worker (its size, progressive or not) survives the pickling
    to the worker's process; a view into the request body arrives as bytes."""
    import pickle

    sent = Encoded(memoryview(b"\xff\xd8 jpeg"), True, (640, 480), True)
    got = pickle.loads(pickle.dumps(sent))
    assert got == Encoded(b"\xff\xd8 jpeg", True, (640, 480), True)
    assert type(got.data) is bytes


@cpu_tensor_decoder
def test_a_tensor_decoder_that_fails_or_changes_pixels_loses_every_size(monkeypatch):
    """The timing holds the tensor decoder to Pillow's pixels on the samples: one that fails
    them, or decodes them otherwise (a changed library), loses whatever its time, and the
    uploads go to Pillow. Faults injected into the real decoder."""
    pre = build_catalog().get("resnet50").transform
    upload = _plain(_jpeg(images.photo((500, 375))))
    for fault in ("other pixels", "fails"):
        decoder = _tensor_decoder()

        def broken(data: Any, p: Any, fault: str = fault) -> tuple[Any, float, float]:
            if fault == "fails":
                raise imaging.ImageError("cannot decode")
            return _Whole(torch.zeros(3, 375, 500, dtype=torch.uint8)), 0.01, 0.0

        monkeypatch.setattr(decoder, "_torchvision", broken)
        report = decoder.pick_by_size(pre, batch=2, repeats=1)
        assert report and all(
            p["decoder"] == "pillow" and p.get("refused") for p in report.values()
        )
        assert not decoder._on_device(upload, pre)


@cpu_tensor_decoder
@needs_shared(CIFAR_WEIGHTS / CIFAR_FILES[MODEL])
def test_models_lists_the_jpeg_decoder_picked_per_size(service):
    """/models says, per model and upload size, which JPEG decoder the workers timed faster
    and both times; models whose transform leaves no size to the tensor decoder say null."""
    import httpx

    entries = {
        e["name"]: e for e in httpx.get(f"{service.url}/models", timeout=30).json()["models"]
    }
    picks = entries["resnet18"]["jpeg_decode"]
    assert set(picks) == {"500x375", "1600x1200"}
    for pick in picks.values():
        assert pick["decoder"] in ("torchvision", "pillow")
        assert pick["decoder"] == min(pick["ms_per_image"], key=pick["ms_per_image"].get)
    assert entries[MODEL]["status"] == "ready" and entries[MODEL]["jpeg_decode"] is None
