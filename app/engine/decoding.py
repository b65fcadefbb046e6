"""Decoding uploads inside a device worker (``IMGCLS_DECODE=worker``).

The API process checks each upload's header (``imaging.probe``: format, size, pixel limit) and
hands the worker the encoded bytes. The worker turns a batch of them into one uint8 tensor:

- on a CUDA worker, plain JPEGs (RGB or grey, upright) are decoded together with nvjpeg
  (``torchvision.io.decode_jpeg(device="cuda")``) and resized on the GPU;
- everything else (PNG, WebP, CMYK or rotated JPEGs, ...) is decoded by Pillow on the worker's
  threads, in parallel, exactly as the API would have.

An upload that cannot be decoded fails alone with the status the API would have given it (400 or
413); the rest of the batch runs. Each Pillow decode has a time budget (``imaging.DECODE_BUDGET_S``)
so that one costly image cannot hold its batch-mates for long, and the allocator hands the memory
of a large decode back to the system afterwards (``app.memory``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
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


@dataclass(frozen=True)
class Encoded:
    """An upload whose header passed the API's checks, still encoded.

    ``data`` may be a view into the request body (the upload is held once in the API process);
    it crosses to the worker as bytes.
    """

    data: imaging.BytesLike
    plain_jpeg: bool  # imaging.Probe.plain_jpeg: eligible for the tensor (GPU) decoder

    def __reduce__(self) -> tuple[type[Encoded], tuple[bytes, bool]]:
        return Encoded, (bytes(self.data), self.plain_jpeg)


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
) -> tuple[dict[K, torch.Tensor], float, float]:
    """Pillow: decode an upload once, resize it for each transform. Returns the uint8 pixels by
    key, and the decode and resize times (ms). Used by the API process (IMGCLS_DECODE=api,
    /compare) and by tests; the worker splits the two steps (``Decoder``).

    ``draft`` (IMGCLS_JPEG_DRAFT): the fast path. JPEGs are decoded at a reduced DCT scale and
    other formats box-reduced (``imaging.decode``), and the resize runs in torch's uint8
    antialiased kernel where it can (``torch_resizable``), ~2-3x cheaper than Pillow's and
    within a thousandth of a grey level of it on average. Without it, Pillow resizes exactly as
    torchvision does."""
    t0 = time.perf_counter()
    image = imaging.decode(data, max_pixels, draft_side(transforms) if draft else None)
    t1 = time.perf_counter()
    by_key = resize(image, transforms, draft)
    return by_key, (t1 - t0) * 1000.0, (time.perf_counter() - t1) * 1000.0


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


def _status(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, imaging.ImageTooLargeError):
        return 413, str(exc)
    if isinstance(exc, imaging.ImageError):
        return 400, str(exc)
    return 400, f"the image data cannot be decoded: {exc}"


class Decoder:
    def __init__(
        self, threads: int, max_pixels: int, device: str, jpeg_on_device: bool, draft: bool = False
    ) -> None:
        self.draft = draft  # IMGCLS_JPEG_DRAFT
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
        self.max_pixels = max_pixels
        self.device = torch.device(device)
        self.jpeg_on_device = jpeg_on_device

    def _pillow(
        self, data: imaging.BytesLike, pre: Preprocess
    ) -> tuple[torch.Tensor | Image.Image, float, float]:
        """Decode (and resize with Pillow) on one of the pool's threads. An image for torch's
        resize comes back decoded: torch's kernels run on OpenMP threads, and a pool thread
        would start a team of its own, whose threads then spin beside the model's (measured:
        the next forward pass 10-25% slower, 1-client latency 41 -> 48 ms for resnet50)."""
        t0 = time.perf_counter()
        side = draft_side({0: pre}) if self.draft else None
        image = imaging.decode(data, self.max_pixels, side)
        t1 = time.perf_counter()
        if torch_resizable(image, pre, self.draft):
            return image, (t1 - t0) * 1000.0, 0.0
        pixels = resize(image, {0: pre}, self.draft)[0]
        return pixels, (t1 - t0) * 1000.0, (time.perf_counter() - t1) * 1000.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _tensor_jpegs(
        self, datas: list[imaging.BytesLike], pre: Preprocess
    ) -> tuple[list[torch.Tensor | None], float, float]:
        """Decode JPEGs together on the device; None where one cannot be decoded there. The
        times returned are the batch's, shared equally by its images."""
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated
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

    def prepare(self, items: list[Item], pre: Preprocess) -> Prepared:
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
        on_device = [i for i, e in encoded.items() if e.plain_jpeg] if self.jpeg_on_device else []
        if on_device:
            done, d_ms, p_ms = self._tensor_jpegs([encoded[i].data for i in on_device], pre)
            for i, px in zip(on_device, done, strict=True):
                if px is not None:
                    pixels[i], decode_ms[i], preprocess_ms[i] = px, d_ms, p_ms
        # Pillow, on the worker's threads, for the rest (and what the tensor decoder refused).
        futures = {
            i: self.pool.submit(self._pillow, e.data, pre)
            for i, e in encoded.items()
            if pixels[i] is None
        }
        index = {fut: i for i, fut in futures.items()}
        for fut in as_completed(index):  # resized here as they come: few wait, decoded
            i = index[fut]
            try:
                out, decode_ms[i], preprocess_ms[i] = fut.result()
                if isinstance(out, Image.Image):  # torch's resize, on this thread
                    t0 = time.perf_counter()
                    out = resize(out, {0: pre}, True)[0]
                    preprocess_ms[i] = (time.perf_counter() - t0) * 1000.0
                pixels[i] = out
            except Exception as exc:
                errors[i] = _status(exc)
        ready = [(i, px) for i, px in enumerate(pixels) if px is not None]
        if any(px.is_floating_point() for _, px in ready):  # images normalised by the client
            from app.preprocess import normalize

            ready = [(i, px if px.is_floating_point() else normalize(px, pre.mean, pre.std))
                     for i, px in ready]  # fmt: skip
        batch = torch.stack([px.to(self.device) for _, px in ready]) if ready else None
        return Prepared(batch, [i for i, _ in ready], errors, decode_ms, preprocess_ms)
