"""Decoding uploads inside a device worker (``IMGCLS_DECODE=worker``).

The API process checks each upload's header (``imaging.probe``: format, size, pixel limit) and
hands the worker the encoded bytes. The worker turns a batch of them into one uint8 tensor:

- plain JPEGs (RGB or grey, upright) go to a tensor decoder at the upload sizes where it timed
  faster than Pillow at load (``Decoder.pick_by_size``; with draft decoding, Pillow's cost
  scales with the image, a full decode's with the upload): on a CUDA worker nvjpeg
  (``torchvision.io.decode_jpeg(device="cuda")``), the batch together, resized on the GPU; on a
  CPU worker torchvision's libjpeg-turbo call, only where it gives Pillow's path's very pixels;
- everything else (PNG, WebP, CMYK or rotated JPEGs, ...) is decoded by Pillow on the worker's
  threads, in parallel, exactly as the API would have.

An upload that cannot be decoded fails alone with the status the API would have given it (400 or
413); the rest of the batch runs. Each Pillow decode has a time budget (``imaging.DECODE_BUDGET_S``)
so that one costly image cannot hold its batch-mates for long, and the allocator hands the memory
of a large decode back to the system afterwards (``app.memory``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
from PIL import Image
from torchvision.transforms import functional as F

from app import imaging, memory

if TYPE_CHECKING:  # the catalog imports the engine; only the type is needed here
    from app.preprocess import Preprocess

K = TypeVar("K")
Report = dict[str, dict[str, object]]  # Decoder.pick_by_size: per size "WxH", the pick and times

# torchvision 0.29 marks its image decoders deprecated, on every call. A targeted filter, once:
# ``warnings.catch_warnings`` swaps the process's filter list and is not safe on the decode
# threads (two overlapping calls leave "ignore everything" behind).
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision"
)


@dataclass(frozen=True)
class Encoded:
    """An upload whose header passed the API's checks, still encoded.

    ``data`` may be a view into the request body (the upload is held once in the API process);
    it crosses to the worker as bytes.
    """

    data: imaging.BytesLike
    plain_jpeg: bool  # imaging.Probe.plain_jpeg: eligible for a tensor decoder
    size: tuple[int, int] = (0, 0)  # (width, height) from the header; (0, 0): unknown
    progressive: bool = False  # imaging.Probe.progressive

    def __reduce__(self) -> tuple[type[Encoded], tuple[bytes, bool, tuple[int, int], bool]]:
        return Encoded, (bytes(self.data), self.plain_jpeg, self.size, self.progressive)


@dataclass(frozen=True)
class _Whole:
    """A decoded image (uint8 (3, H, W)) for torch's resize on the model's thread."""

    image: torch.Tensor


Item = torch.Tensor | Encoded  # uint8 pixels (3, S, S) already prepared, or an upload


@dataclass
class Prepared:
    """A batch ready for the model, and what happened to each item."""

    batch: torch.Tensor | None  # uint8 (rows, 3, S, S); None when no item could be decoded
    rows: list[int]  # the item index of each row
    errors: dict[int, tuple[int, str]] = field(default_factory=dict)  # item -> (status, message)
    decode_ms: list[float] = field(default_factory=list)  # per item
    preprocess_ms: list[float] = field(default_factory=list)


# JPEG draft decoding keeps >= 3x the resize target on the short side. 2x moved top-1 of the
# real CIFAR-10 ResNets on 1.5-1.7% of upscaled JPEGs (guard: <= 1%); 3x on 0.4% (resnet56).
# resnet50 (resize 232) still decodes a 4032x3024 photo at 1/4.
DRAFT_MARGIN = 3


# The sizes at which a worker with a tensor decoder (nvjpeg) times it against Pillow at load: an
# ImageNet-size photo, a 2-megapixel one and a 12-megapixel phone photo. An upload goes to the
# decoder that was faster at the nearest of them (in log pixels).
DECODE_SIZES = ((500, 375), (1600, 1200), (4032, 3024))


@functools.lru_cache(maxsize=len(DECODE_SIZES))
def sample_jpeg(width: int, height: int) -> bytes:
    """A JPEG (quality 92) with a photo's bit rate, for timing decoders: smooth colour regions
    with fine grain, ~1.1 bits per pixel (the shared phone-size photos: ~0.65; ImageNet-size:
    ~1.8), so that entropy decoding weighs as it does on real uploads. One 500x375 tile,
    repeated: cheap to make at 12 megapixels."""
    g = torch.Generator().manual_seed(0)
    tile_w, tile_h = min(width, 500), min(height, 375)
    coarse = torch.randint(0, 256, (3, tile_h // 48 + 1, tile_w // 48 + 1), generator=g)
    smooth = F.pil_to_tensor(
        F.to_pil_image(coarse.to(torch.uint8)).resize((tile_w, tile_h), Image.Resampling.BICUBIC)
    )
    grain = torch.randint(-2, 3, (3, tile_h, tile_w), generator=g)
    tile = (smooth.to(torch.int16) + grain).clamp(0, 255).to(torch.uint8)
    reps = (1, -(-height // tile_h), -(-width // tile_w))
    pixels = tile.repeat(reps)[:, :height, :width]
    out = io.BytesIO()
    F.to_pil_image(pixels).save(out, "JPEG", quality=92)
    return out.getvalue()


def draft_side(transforms: Mapping[K, Preprocess]) -> int:
    """The short side a JPEG may be decoded down to for these transforms (IMGCLS_JPEG_DRAFT):
    DRAFT_MARGIN times the largest resize target, so the antialiased resize still averages."""
    sides = [t.resize if isinstance(t.resize, int) else max(t.resize) for t in transforms.values()]
    return DRAFT_MARGIN * max(sides)


def decode_pixels(
    data: imaging.BytesLike,
    max_pixels: int,
    transforms: Mapping[K, Preprocess],
    draft: bool = False,
    checked: bool = False,
    probe: imaging.Probe | None = None,
) -> tuple[dict[K, torch.Tensor], float, float]:
    """Pillow: decode an upload once, resize it for each transform. Returns the uint8 pixels by
    key, and the decode and resize times (ms). Used by the API process (IMGCLS_DECODE=api,
    /compare) and by tests; the worker splits the two steps (``Decoder``).

    ``draft`` (IMGCLS_JPEG_DRAFT): the fast path. JPEGs are decoded at a reduced DCT scale and
    other formats box-reduced (``imaging.decode``), and the resize runs in torch's uint8
    antialiased kernel where it can (``torch_resizable``), ~2-3x cheaper than Pillow's and
    within a thousandth of a grey level of it on average. Without it, Pillow resizes exactly as
    torchvision does. ``checked``: ``imaging.probe`` ran on ``data`` already (``probe``: what it
    read, when the caller has it: not read again to group several transforms).

    Each transform gets the pixels it gets alone (a model's answer in /compare is its answer in
    /classify): drafted, one decode per reduction of the image (a 32-pixel CIFAR model beside a
    224-pixel ImageNet one was given the ImageNet model's finer decode, and its top-1 could
    change); models whose targets give this image the same reduction share one."""
    by_key: dict[K, torch.Tensor] = {}
    decode_ms = resize_ms = 0.0
    groups = _by_reduction(data, max_pixels, transforms, probe) if draft else [dict(transforms)]
    for group in groups:
        image, ms = _decode(data, max_pixels, group, draft, checked)
        t1 = time.perf_counter()
        by_key.update(resize(image, group, draft))
        decode_ms, resize_ms = decode_ms + ms, resize_ms + (time.perf_counter() - t1) * 1000.0
    return by_key, decode_ms, resize_ms


def _by_reduction(
    data: imaging.BytesLike,
    max_pixels: int,
    transforms: Mapping[K, Preprocess],
    probe: imaging.Probe | None,
) -> list[dict[K, Preprocess]]:
    """The transforms grouped by the reduction each gives the image alone (``imaging.reduction``,
    from its header), the finest (the largest decode) first."""
    if len(transforms) == 1:
        return [dict(transforms)]
    probe = probe or imaging.probe(data, max_pixels)
    sides = sorted(((draft_side({k: t}), k) for k, t in transforms.items()), key=lambda s: -s[0])
    groups: dict[int, dict[K, Preprocess]] = {}
    for side, key in sides:
        groups.setdefault(imaging.reduction(probe, side), {})[key] = transforms[key]
    return list(groups.values())


def _decode(
    data: imaging.BytesLike,
    max_pixels: int,
    transforms: Mapping[K, Preprocess],
    draft: bool,
    checked: bool = False,
) -> tuple[Image.Image, float]:
    """``imaging.decode`` for these transforms (reduced where ``draft``), and its time (ms)."""
    t0 = time.perf_counter()
    side = draft_side(transforms) if draft else None
    image = imaging.decode(data, max_pixels, side, checked=checked)
    return image, (time.perf_counter() - t0) * 1000.0


def resize(
    image: Image.Image, transforms: Mapping[K, Preprocess], draft: bool
) -> dict[K, torch.Tensor]:
    """The uint8 pixels of a decoded image for each transform (see ``decode_pixels``); closes
    the image and hands a large one's memory back."""
    tensor = None
    try:
        source = _tensor_source(image) if draft else None
        if source is not None and any(t.tensor_resize for t in transforms.values()):
            tensor = F.pil_to_tensor(image)  # a copy of the decoded pixels
        return {
            key: (
                t.pixels_from_tensor(tensor, source).contiguous()
                if tensor is not None and t.tensor_resize
                else t.pixels(image)
            )
            for key, t in transforms.items()
        }
    finally:
        pixels = image.size[0] * image.size[1]
        image.close()
        del image, tensor  # both gone before the allocator is asked to give memory back
        memory.after_large_buffer(pixels * 3)


def torch_resizable(image: Image.Image, pre: Preprocess, draft: bool) -> bool:
    """Whether ``resize`` runs torch's kernel (intra-op parallel: in a worker, called from the
    thread that runs the model, whose OpenMP threads it shares; see ``Decoder``)."""
    return draft and pre.tensor_resize and _tensor_source(image) is not None


def _tensor_source(image: Image.Image) -> tuple[int, int] | None:
    """The full size of an RGB image that torch can resize as a whole: one decoded at full size,
    or at a reduced scale that holds exactly all of it. None where only Pillow can, from the
    region ``info["source_box"]``: a scaled side rounded up to a partial last block."""
    if image.mode != "RGB":
        return None
    source = image.info.get("source_size")
    if source is None:
        return image.size
    box = image.info.get("source_box")
    if box is not None and tuple(box) != (0, 0, *image.size):
        return None
    return (int(source[0]), int(source[1]))


@contextlib.contextmanager
def _one_intra_op_thread(on: bool) -> Iterator[None]:
    """On a CPU worker, torch's resizes (on the model's thread, while the pool decodes) run on
    one intra-op thread: a team of OpenMP threads would compete with the decoding threads for
    the same cores, and its idle members spin. resnet50 on 2 cores, phone-size uploads: a
    batch's decode-and-resize 105 -> 81 ms, torch's resize 5.8 -> 2.7 ms per image (bf16,
    in-process). The model's own thread count is restored for its forward pass."""
    if not on:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _status(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, imaging.ImageTooLargeError):
        return 413, str(exc)
    if isinstance(exc, imaging.ImageError):
        return 400, str(exc)
    return 400, f"the image data cannot be decoded: {exc}"


class Decoder:
    """Turns a worker's batch of uploads into one uint8 tensor.

    Plain JPEGs (``imaging.Probe.plain_jpeg``) can go to a tensor decoder instead of Pillow,
    where ``pick_by_size`` timed it faster at load for the upload's size:
    - on a CUDA worker, nvjpeg: the batch together, resized on the GPU. Its pixels differ
      slightly from Pillow's, so an upload's scores can differ slightly between workers that
      timed differently;
    - on a CPU worker with draft decoding on, torchvision's libjpeg-turbo on the pool's threads,
      only where it gives the very pixels Pillow's path gives: libjpeg-turbo as well (3.1.3 in
      torchvision 0.29, 3.2.0 in Pillow 13; checked on the samples at load by
      ``pick_by_size``), at sizes Pillow would not decode at a reduced scale, then the same
      torch resize. Baseline JPEGs only: a progressive one can hold any number of scans, and
      only Pillow's path enforces the decode budget.
    """

    def __init__(
        self, threads: int, max_pixels: int, device: str, jpeg_on_device: bool, draft: bool = False
    ) -> None:
        self.draft = draft  # IMGCLS_JPEG_DRAFT
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
        self.max_pixels = max_pixels
        self.device = torch.device(device)
        self.jpeg_on_device = jpeg_on_device
        # per transform geometry, from pick_by_size: ((pixels, tensor decoder faster), ...) at
        # DECODE_SIZES, and the report for /models
        self._timed: dict[tuple[object, ...], tuple[tuple[tuple[int, bool], ...], Report]] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def tensor_decoder(self) -> str:
        """What decodes JPEGs as tensors here: nvjpeg on CUDA, libjpeg-turbo on the CPU."""
        return "nvjpeg" if self.cuda else "torchvision"

    def tensor_eligible(self, item: Encoded, pre: Preprocess) -> bool:
        """Whether the tensor decoder may take this upload at all (see the class)."""
        if not (self.jpeg_on_device and item.plain_jpeg):
            return False
        if self.cuda:
            return True
        short = min(item.size)
        return (
            self.draft
            and pre.tensor_resize
            and not item.progressive
            and short > 0
            and not imaging.draft_scales(short, draft_side({0: pre}))
        )

    def _on_device(self, item: Encoded, pre: Preprocess, forced: bool | None = None) -> bool:
        """Whether the tensor decoder takes this upload: one it may take, at a size where it
        timed faster than Pillow (the nearest size timed, in log pixels), or ``forced``. Where
        nothing was timed (timing failed, or no sample size is one it may take): on CUDA it
        does, as before timing existed; on the CPU, Pillow does."""
        if not self.tensor_eligible(item, pre):
            return False
        if forced is not None:
            return forced
        picks = self._timed[pre.geometry][0] if pre.geometry in self._timed else ()
        pixels = item.size[0] * item.size[1]
        if not picks or pixels <= 0:
            return self.cuda
        nearest = min(picks, key=lambda pick: abs(math.log(pick[0] / pixels)))
        return nearest[1]

    def timed(self, pre: Preprocess) -> Report | None:
        """What ``pick_by_size`` reported for this transform's geometry, if it ran."""
        return self._timed[pre.geometry][1] if pre.geometry in self._timed else None

    def pick_by_size(self, pre: Preprocess, batch: int, repeats: int = 3) -> Report:
        """Time the tensor decoder against Pillow, each decoding and resizing ``batch`` sample
        JPEGs for ``pre`` as ``prepare`` does, at each of DECODE_SIZES; keep, per size, the
        faster for ``prepare``. The tensor decoder loses a size outright where it fails an image
        there or, on the CPU, where its pixels are not exactly Pillow's path's (a decoder or
        library that changed). Returns, per size ("WxH"), the decoder picked and both times (ms
        per image, the best of ``repeats`` after a first run that warms up), for /models. Once
        per transform geometry; sizes the tensor decoder may not take are left out."""
        if pre.geometry in self._timed:
            return self._timed[pre.geometry][1]
        picks: list[tuple[int, bool]] = []
        report: Report = {}
        for width, height in DECODE_SIZES:
            if not self.tensor_eligible(Encoded(b"", True, (width, height)), pre):
                continue
            items: list[Item] = [Encoded(sample_jpeg(width, height), True, (width, height))]
            items = items * batch
            ms: dict[bool, float] = {}
            out: dict[bool, Prepared] = {}
            for on_device in (False, True):
                runs = []
                for _ in range(repeats + 1):
                    t0 = time.perf_counter()
                    out[on_device] = self.prepare(items, pre, on_device=on_device)
                    self._sync()
                    runs.append((time.perf_counter() - t0) * 1000.0 / batch)
                ms[on_device] = min(runs[1:])
            pillow, tensor = out[False], out[True]
            works = not tensor.errors and tensor.rows == pillow.rows == list(range(batch))
            if works and not self.cuda:
                assert tensor.batch is not None and pillow.batch is not None
                works = torch.equal(tensor.batch, pillow.batch)
            faster = works and ms[True] < ms[False]
            picks.append((width * height, faster))
            report[f"{width}x{height}"] = {
                "decoder": self.tensor_decoder if faster else "pillow",
                "ms_per_image": {self.tensor_decoder: round(ms[True], 3),
                                 "pillow": round(ms[False], 3)},
            }  # fmt: skip
            if not works:
                report[f"{width}x{height}"]["refused"] = (
                    f"{self.tensor_decoder} failed the sample or gave other pixels than Pillow"
                )
        self._timed[pre.geometry] = (tuple(picks), report)
        return report

    def _pillow(
        self, data: imaging.BytesLike, pre: Preprocess
    ) -> tuple[torch.Tensor | Image.Image | _Whole, float, float]:
        """Decode (and resize with Pillow) on one of the pool's threads. An image for torch's
        resize comes back decoded: torch's kernels run on OpenMP threads, and a pool thread
        would start a team of its own, whose threads then spin beside the model's (measured:
        the next forward pass 10-25% slower, 1-client latency 41 -> 48 ms for resnet50)."""
        image, decode_ms = _decode(data, self.max_pixels, {0: pre}, self.draft)
        if torch_resizable(image, pre, self.draft):
            return image, decode_ms, 0.0
        t1 = time.perf_counter()
        pixels = resize(image, {0: pre}, self.draft)[0]
        return pixels, decode_ms, (time.perf_counter() - t1) * 1000.0

    def _torchvision(
        self, data: imaging.BytesLike, pre: Preprocess
    ) -> tuple[torch.Tensor | Image.Image | _Whole, float, float]:
        """CPU: torchvision's JPEG decoder on one of the pool's threads (a libjpeg-turbo call:
        no OpenMP team); torch's resize then runs on the model's thread. A stream it refuses
        goes to Pillow, whose answer (an image, or the error the client gets) stands."""
        from torchvision.io import ImageReadMode, decode_jpeg

        t0 = time.perf_counter()
        try:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # writable: no warning
            image = decode_jpeg(raw, ImageReadMode.RGB)
        except Exception:  # refused, or the decoder itself failed: Pillow answers
            return self._pillow(data, pre)
        return _Whole(image), (time.perf_counter() - t0) * 1000.0, 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _tensor_jpegs(
        self, datas: list[imaging.BytesLike], pre: Preprocess
    ) -> tuple[list[torch.Tensor | None], float, float]:
        """CUDA: decode JPEGs together on the device; None where one cannot be decoded there.
        The times returned are the batch's, shared equally by its images."""
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        t0 = time.perf_counter()
        try:
            decoded: list[torch.Tensor | None] = list(
                decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)
            )
        except RuntimeError:  # one bad stream fails the call: decode one by one
            decoded = []
            for r in raw:
                try:
                    decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
        self._sync()
        t1 = time.perf_counter()
        out = [pre.pixels_from_tensor(img) if img is not None else None for img in decoded]
        self._sync()
        n = max(1, len(datas))
        return out, (t1 - t0) * 1000.0 / n, (time.perf_counter() - t1) * 1000.0 / n

    def prepare(
        self, items: list[Item], pre: Preprocess, on_device: bool | None = None
    ) -> Prepared:
        """Decode and resize a batch. ``on_device``: every upload the tensor decoder can take
        goes to it (True) or to Pillow (False), instead of by size (``pick_by_size``)."""
        with _one_intra_op_thread(not self.cuda):
            return self._prepare(items, pre, on_device)

    def _prepare(self, items: list[Item], pre: Preprocess, on_device: bool | None) -> Prepared:
        n = len(items)
        pixels: list[torch.Tensor | None] = [None] * n
        decode_ms = [0.0] * n
        preprocess_ms = [0.0] * n
        errors: dict[int, tuple[int, str]] = {}
        encoded: dict[int, Encoded] = {}
        for i, it in enumerate(items):
            if isinstance(it, Encoded):
                encoded[i] = it
            else:
                pixels[i] = it
        tensor = {i for i, e in encoded.items() if self._on_device(e, pre, on_device)}
        if tensor and self.cuda:  # nvjpeg: the batch together, on the device
            done, d_ms, p_ms = self._tensor_jpegs([encoded[i].data for i in sorted(tensor)], pre)
            for i, px in zip(sorted(tensor), done, strict=True):
                if px is not None:
                    pixels[i], decode_ms[i], preprocess_ms[i] = px, d_ms, p_ms
        # On the worker's threads: Pillow, or on the CPU torchvision's decoder, for the rest (and
        # Pillow for what nvjpeg refused).
        futures = {
            i: self.pool.submit(
                self._torchvision if i in tensor and not self.cuda else self._pillow, e.data, pre
            )
            for i, e in encoded.items()
            if pixels[i] is None
        }
        index = {fut: i for i, fut in futures.items()}
        whole = 0  # bytes of the largest image torchvision decoded here
        for fut in as_completed(index):  # resized here as they come: few wait, decoded
            i = index[fut]
            try:
                out, decode_ms[i], preprocess_ms[i] = fut.result()
                if not isinstance(out, torch.Tensor):  # torch's resize, on this thread
                    t0 = time.perf_counter()
                    if isinstance(out, _Whole):  # as ``resize`` does from a full decode
                        whole = max(whole, out.image.numel())
                        size = (out.image.shape[2], out.image.shape[1])
                        out = pre.pixels_from_tensor(out.image, size).contiguous()
                    else:
                        out = resize(out, {0: pre}, True)[0]
                    preprocess_ms[i] = (time.perf_counter() - t0) * 1000.0
                pixels[i] = out
            except Exception as exc:
                errors[i] = _status(exc)
        if whole:  # the futures hold the decoded images: gone with them, then trim
            del futures, index, fut
            memory.after_large_buffer(whole)
        ready = [(i, px) for i, px in enumerate(pixels) if px is not None]
        if any(px.is_floating_point() for _, px in ready):  # images normalised by the client
            from app.preprocess import normalize

            ready = [(i, px if px.is_floating_point() else normalize(px, pre.mean, pre.std))
                     for i, px in ready]  # fmt: skip
        batch = torch.stack([px.to(self.device) for _, px in ready]) if ready else None
        return Prepared(batch, [i for i, _ in ready], errors, decode_ms, preprocess_ms)
