"""Bytes -> RGB image. Every input limit on images lives here.

The header is read first and the pixel count checked before any pixel is decoded, so a
decompression bomb is never expanded. Before that, a cheap walk over the file's structure refuses
files whose *work* is out of proportion to their size (a progressive JPEG with thousands of scans,
hundreds of thousands of PNG chunks or GIF blocks, millions of TIFF strips), and every decode runs
under a time budget. Only the accepted formats' parsers ever see an upload.
"""

from __future__ import annotations

import io
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Literal, cast

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from app import memory

ACCEPTED_DESCRIPTION = "JPEG, PNG, WebP, BMP, GIF or TIFF"
# The only Pillow plugins that may open an upload (MPO opens through JPEG's). Any other would
# parse it first, in Python, and some parse a whole file before it could be refused: EPS reads
# 20 MB line by line for 20 s.
OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's warnings about an upload it reads anyway (a TIFF tag past the file's end, a palette
# without room for transparency): the client's file, answered, not the server's condition. A
# client could put warnings in the service's log at will. One filter for the process:
# ``warnings.catch_warnings`` is not safe on the decode threads (engine/decoding.py).
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
# The pixel limit is IMGCLS_MAX_PIXELS, checked on the header (``_open``) before anything is
# decoded. Pillow's own (89.5 MP, a warning, then an error at twice that) ran first: its
# message named its figure, not the setting, and no setting above 89.5 MP could take effect.
Image.MAX_IMAGE_PIXELS = None

# Resizing the short side of a 1x10000 strip to 256 pixels would make 2.5 million columns: an
# extreme aspect ratio is a memory bomb of its own, so it is refused like an oversized image.
MAX_ASPECT_RATIO = 50

# Decode budgets. libjpeg re-walks the whole coefficient buffer for every scan of a progressive
# JPEG, so decode time grows with scans x pixels: 2,000 repeated scans of a 16x16 image declared
# 6000x6000 take a minute of CPU (issue 16). Encoders write 10 scans (3 components), 18 (CMYK);
# libjpeg-turbo's own tools cap scans for this reason (djpeg -maxscans). Pillow parses JPEG
# markers before the frame header, PNG chunks before the first IDAT (and each IDAT) and GIF
# blocks before the first image in Python, so hostile counts of them cost seconds per megabyte.
MAX_JPEG_SCANS = 100
MAX_JPEG_SEGMENTS = 1000  # markers with a length (APPn, DQT, DHT, SOS, COM, ...)
# Bytes before the first scan that belong to no segment: junk between segments and 0xFF fill
# bytes. Pillow skips them one read(1) at a time in Python (~0.65 s per MB, in the API's header
# check and again in the worker); encoders write none, or a few fill bytes.
MAX_JPEG_PADDING = 64 * 1024
MAX_PNG_CHUNKS = 20_000  # a 20 MB PNG written in libpng's 8 KB IDAT chunks has 2,560
MAX_PNG_ANCILLARY = 1000  # chunks other than IDAT
MAX_GIF_BLOCKS = 10_000  # extension blocks and their sub-blocks before the first image
# Pillow turns each of a TIFF's strip or tile offsets into a Python object as it opens the file
# (~2 us and ~300 bytes each): 2.4 million one-row strips in a 19 MB file took 5 s and 750 MB
# before the image could be refused. A 40-megapixel image at the widest accepted aspect ratio
# (50:1) in one-row strips, planes stored apart, has 134,000; in tiles of 256x256, a few hundred
# (in 16x16 tiles, the smallest TIFF allows, 156,000: refused).
MAX_TIFF_VALUES = 150_000  # numbers in one tag of the first image's directory
MAX_TIFF_TAGS = 1000  # entries in that directory
# StripOffsets, StripByteCounts, TileOffsets, TileByteCounts: one tile object each, whatever
# their field type (BYTE offsets too: one strip per byte of the file)
_TIFF_LAYOUT_TAGS = {273, 279, 324, 325}
# Wall-clock budget of one decode: checked each time Pillow pulls a block of compressed data
# (READ_BLOCK bytes), so a decode that overruns stops within a block's worth of work. A
# 40-megapixel JPEG decodes in 0.3-0.6 s on a 2-core EPYC; the budget leaves room for a busy host.
DECODE_BUDGET_S = 5.0
# 256 KB: ~5-10 ms of entropy decoding between checks. 16 KB blocks made two threads decode
# phone photos (drafted to 1/4) only 1.46x as fast as one, where 256 KB gives 1.87x (10.1 ->
# 7.6 ms per image on 2 cores; one thread 14.7 -> 14.2 ms): every block is a trip back through
# Python and the GIL.
READ_BLOCK = 256 * 1024

BytesLike = bytes | bytearray | memoryview


class ImageError(ValueError):
    """The upload is not an image this service accepts (HTTP 400)."""


class ImageBudgetError(ImageError):
    """The image would cost too much to decode: too many scans, markers or chunks for its size,
    or its decode overran DECODE_BUDGET_S (HTTP 400, the message names which)."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed (HTTP 413)."""


class _Source(io.RawIOBase):
    """The upload as a read-only file, without a copy (``io.BytesIO`` copies any buffer but
    ``bytes``), that refuses to be read after ``deadline``: Pillow pulls compressed data through
    ``read`` block by block while it decodes, so this is where an overlong decode is stopped."""

    def __init__(self, data: BytesLike) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0
        self.deadline: float | None = None
        self.budget_s = 0.0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ImageBudgetError(
                f"decoding the image took longer than its {self.budget_s:g} s budget"
            )

    def read(self, size: int | None = -1) -> bytes:
        self.check()
        end = (
            len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        )
        chunk = bytes(self._view[self._pos : end])
        self._pos = max(self._pos, end)
        return chunk

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        chunk = self.read(len(out))
        out[: len(chunk)] = chunk
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._view.release()
        super().close()


# After a scan's entropy-coded data the next marker is 0xFF followed by anything but 0x00 (a
# stuffed byte), 0xD0-0xD7 (restart markers, part of the data) or 0xFF (fill).
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Junk, then fill bytes: up to the 0xFF that starts the next marker (the last of the run).
_JPEG_TO_MARKER = re.compile(rb"[^\xff]*\xff+")


def _check_jpeg(data: BytesLike) -> None:
    n, pos, segments, scans, padding = len(data), 2, 0, 0, 0
    while pos + 4 <= n:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):  # junk or fill, as Pillow reads
            if scans:  # after a scan libjpeg skips them (in C): the scans are still counted
                found = _JPEG_NEXT_MARKER.search(data, pos + 1)
                if found is None:
                    return
                pos = found.start()
                continue
            end = min(n, pos + MAX_JPEG_PADDING + 2)
            junk_from = pos + 1 if data[pos + 1] == 0x00 else pos  # 0xFF 0x00: junk from the 0x00
            found = _JPEG_TO_MARKER.match(data, junk_from, end)
            skipped = (found.end() - 1 if found else end) - pos
            padding += skipped
            if padding > MAX_JPEG_PADDING:
                raise ImageBudgetError(
                    f"the JPEG has more than {MAX_JPEG_PADDING // 1024} KB of bytes between "
                    "its header's segments (junk or fill); refused unread"
                )
            pos += skipped
            continue
        marker = data[pos + 1]
        pos += 2
        if marker == 0xD9:  # EOI
            return
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):  # no length field
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageBudgetError(
                f"the JPEG has more than {MAX_JPEG_SEGMENTS:,} marker segments; refused unread"
            )
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if marker == 0xDA:  # start of scan: skip its entropy-coded data
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageBudgetError(
                    f"the JPEG has more than {MAX_JPEG_SCANS} scans (progressive JPEGs need "
                    "about 10); it would take too long to decode"
                )
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                return
            pos = found.start()


def _check_png(data: BytesLike) -> None:
    n, pos, chunks, ancillary = len(data), 8, 0, 0
    while pos + 8 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = bytes(data[pos + 4 : pos + 8])
        chunks += 1
        if kind != b"IDAT":
            ancillary += 1
        if chunks > MAX_PNG_CHUNKS or ancillary > MAX_PNG_ANCILLARY:
            raise ImageBudgetError(
                f"the PNG has more than {MAX_PNG_CHUNKS:,} chunks (or {MAX_PNG_ANCILLARY:,} "
                "besides image data); refused unread"
            )
        if kind == b"IEND":
            return
        pos += 12 + length


def _check_gif(data: BytesLike) -> None:
    n = len(data)
    if n < 13:
        return
    pos = 13
    if data[10] & 0x80:  # global colour table
        pos += 3 * (2 ** ((data[10] & 7) + 1))
    blocks = 0
    while pos < n:
        kind = data[pos]
        if kind != 0x21:  # 0x2C image descriptor, 0x3B trailer, or corrupt: Pillow takes over
            return
        pos += 2  # introducer and label, then sub-blocks until an empty one
        while pos < n:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise ImageBudgetError(
                    f"the GIF has more than {MAX_GIF_BLOCKS:,} blocks before its first image; "
                    "refused unread"
                )
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break


# TIFF field types whose values Pillow unpacks into Python numbers, one object each (BYTE,
# UNDEFINED and ASCII stay one bytes object: large XMP or Photoshop blocks are ordinary):
# SBYTE, SHORT, LONG, RATIONAL, SSHORT, SLONG, SRATIONAL, FLOAT, DOUBLE, IFD, LONG8, SLONG8, IFD8
_TIFF_NUMBERS = {3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16, 17, 18}


def _check_tiff(data: BytesLike) -> None:
    """The first image file directory (the one Pillow opens): how many tags, and how many
    numbers each holds (strip and tile offsets above all)."""
    order: Literal["little", "big"] = "little" if bytes(data[:2]) == b"II" else "big"

    def num(pos: int, size: int) -> int:
        return int.from_bytes(data[pos : pos + size], order)

    big = num(2, 2) == 43  # BigTIFF: 8-byte counts and offsets
    ifd = num(8, 8) if big else num(4, 4)
    width, entry = (8, 20) if big else (2, 12)
    if ifd + width > len(data):
        return  # corrupt: Pillow will say so
    tags = num(ifd, width)
    if tags > MAX_TIFF_TAGS:
        raise ImageBudgetError(f"the TIFF has {tags:,} tags in its image directory; refused unread")
    pos = ifd + width
    for _ in range(tags):
        if pos + entry > len(data):
            return
        tag, kind = num(pos, 2), num(pos + 2, 2)
        count = num(pos + 4, 8 if big else 4)
        if (kind in _TIFF_NUMBERS or tag in _TIFF_LAYOUT_TAGS) and count > MAX_TIFF_VALUES:
            raise ImageBudgetError(
                f"the TIFF's tag {tag} holds {count:,} values (more than {MAX_TIFF_VALUES:,}: "
                "strips or tiles far beyond what an image needs); refused unread"
            )
        pos += entry


def check_structure(data: BytesLike) -> None:
    """Refuse, from a walk over the file's markers, chunks or blocks (no pixel decoded, no
    entropy-coded data interpreted), a file whose decode would cost far more than its size
    suggests. Formats without such amplification pass untouched."""
    head = bytes(data[:8])
    if head[:3] == b"\xff\xd8\xff":
        _check_jpeg(data)
    elif head == b"\x89PNG\r\n\x1a\n":
        _check_png(data)
    elif head[:4] == b"GIF8":
        _check_gif(data)
    elif head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _check_tiff(data)


# pixels converted at a time by ``_to_rgb`` (whole rows, a quarter of a megapixel): a
# conversion's temporaries stay a few MB whatever the image's size
STRIP_PIXELS = 1 << 18
_GREY_INT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA = {"RGBA", "LA", "PA", "La", "RGBa"}


def _to_rgb(img: Image.Image, check: Callable[[], None] = lambda: None) -> Image.Image:
    """``img`` as RGB: deep grey scaled to 8 bits, float grey stretched over its range,
    transparency composited on white. Where that takes more than Pillow's own convert, it runs
    strip by strip (``_by_strips``): a 5 KB palette PNG with a transparent colour or a 90 KB
    16-bit PNG at the pixel limit used to take 0.8-1.3 GB at once (float64 arrays, RGBA copies
    of the whole image); it now takes the source and the RGB result, as a plain RGB PNG does.
    ``check`` runs between strips (the decode budget's clock)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _GREY_INT:
        # 16-bit (or 32-bit integer) grey: scale to 8 bits rather than clip at 255.
        # (Pillow has no extrema for I;16B and the other explicit byte orders: not needed)
        deep = mode.startswith("I;16") or cast(tuple[float, float], img.getextrema())[1] > 255
        peak = 65535.0 if deep else 255.0

        def grey(part: Image.Image) -> Image.Image:
            arr = np.asarray(part, dtype=np.float64)
            return _grey_rgb(np.clip(np.rint(arr * (255.0 / peak)), 0, 255))

        return _by_strips(img, grey, check)
    if mode == "F":
        lo, hi = _float_range(img, check)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0

        def stretch(part: Image.Image) -> Image.Image:
            arr = np.asarray(part, dtype=np.float64)
            return _grey_rgb(np.nan_to_num((arr - lo) * scale))

        return _by_strips(img, stretch, check)
    if mode in _ALPHA or (mode == "P" and "transparency" in img.info):
        return _by_strips(img, _on_white, check)
    return img.convert("RGB")


def _grey_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")


def _on_white(part: Image.Image) -> Image.Image:
    """Transparency composited on white, as a viewer shows it."""
    rgba = part.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _strips(img: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    """``img``'s rows, ~STRIP_PIXELS at a time: (top row, a copy of the strip, same mode,
    palette and info)."""
    width, height = img.size
    rows = max(1, STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield top, img.crop((0, top, width, min(height, top + rows)))


def _by_strips(
    img: Image.Image, convert: Callable[[Image.Image], Image.Image], check: Callable[[], None]
) -> Image.Image:
    """``convert`` (a strip of ``img`` -> the strip in RGB) over ``img``, one strip at a time."""
    out = Image.new("RGB", img.size)
    for top, part in _strips(img):
        check()
        out.paste(convert(part), (0, top))
    return out


def _float_range(img: Image.Image, check: Callable[[], None]) -> tuple[float, float]:
    """The smallest and largest value of a float image, NaN left out (NaN when all are)."""
    lo, hi = np.nan, np.nan
    for _, part in _strips(img):
        check()
        arr = np.asarray(part, dtype=np.float64)
        lo, hi = (
            np.fmin(lo, np.fmin.reduce(arr, axis=None)),
            np.fmax(hi, np.fmax.reduce(arr, axis=None)),
        )
    return float(lo), float(hi)


@dataclass(frozen=True)
class Probe:
    """What the header says, read without decoding a pixel."""

    format: str
    mode: str
    width: int
    height: int
    orientation: int  # EXIF orientation, 1 when absent
    progressive: bool = False  # a progressive JPEG: any number of scans (see Decoder)

    @property
    def plain_jpeg(self) -> bool:
        """A JPEG that a tensor decoder (torchvision.io, nvjpeg) gives exactly as Pillow does:
        RGB or grey, upright (no EXIF rotation to apply), a single frame."""
        return self.format == "JPEG" and self.mode in ("RGB", "L") and self.orientation == 1


def _open(
    data: BytesLike, max_pixels: int, checked: bool = False, budget_s: float = DECODE_BUDGET_S
) -> tuple[Image.Image, _Source]:
    """Open and check the structure (unless ``checked``: ``probe`` walked it already) and
    header: decode budgets, format, dimensions, pixel count, aspect ratio. Returns the image
    and the ``_Source`` over ``data`` it reads from, whose ``budget_s`` of wall-clock time
    runs from here (Pillow parses headers in Python: the header counts)."""
    if not len(data):
        raise ImageError("the uploaded file is empty")
    if not checked:
        check_structure(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            source = _Source(data)
            source.deadline, source.budget_s = time.monotonic() + budget_s, budget_s
            img = Image.open(cast(IO[bytes], source), formats=OPEN_FORMATS)
            img.format  # noqa: B018 - the header is parsed by open()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image dimensions are too large: {exc}") from None
    except ImageBudgetError:  # the header's parse overran the budget
        raise
    except UnidentifiedImageError:  # no accepted format's plugin recognised it
        raise ImageError(
            "the upload is not a readable image in an accepted format; accepted formats: "
            f"{ACCEPTED_DESCRIPTION}"
        ) from None
    except Exception as exc:  # Pillow raises a variety of errors on malformed headers
        raise ImageError(f"the image header cannot be read: {exc}") from None

    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"image has invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height) and max(width, height) > 64:
        raise ImageError(
            f"image is {width}x{height}: aspect ratios beyond {MAX_ASPECT_RATIO}:1 are not accepted"
        )
    return img, source


def probe(data: BytesLike, max_pixels: int) -> Probe:
    """Check an upload's structure and header (the same checks as ``decode``, same errors)
    without decoding.

    Cheap (a walk over markers capped by the budgets above, then the header); what passes is
    decoded later, in a worker.
    """
    img, _ = _open(data, max_pixels)
    try:
        orientation = int(img.getexif().get(0x0112, 1)) if img.format == "JPEG" else 1
    except Exception:  # a malformed EXIF block: let the full decoder deal with the image
        orientation = 0
    progressive = bool(img.info.get("progressive") or img.info.get("progression"))
    return Probe(str(img.format), img.mode, img.size[0], img.size[1], orientation, progressive)


Box = tuple[float, float, float, float]
# where a scaled decode records the full image's size and the region that holds it (info keys)
SCALE_KEYS = ("source_size", "source_box")
# JPEG, and MPO (a JPEG with more images after it: phone cameras' Ultra HDR and depth photos)
SCALED_DECODE = ("JPEG", "MPO")


# Bytes per pixel Pillow stores a decoded image of each mode ("RGB", "LA" and the rest: 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Held besides the decoded source, per pixel: its RGB conversion or the copy an EXIF rotation
# makes (4), and what a resize's tensor is made from (``pil_to_tensor``: the bytes, an array
# of them and its copy, 3 + 3 + 3; measured: 12.4 bytes a pixel in all for a grey PNG).
_BESIDES = 13
# Held by the decoder itself, per pixel: Pillow's WebP decoder keeps a canvas and a copy of the
# frame (4 + 4); libtiff a buffer of the whole image for a strip or tile layout (up to 8).
_DECODER_BYTES = {"WEBP": 8, "TIFF": 8}


def peak_bytes(probe: Probe, min_side: int | None) -> int:
    """A bound on the memory ``decode`` (with ``min_side``) and a resize after it hold at once
    for the image ``probe`` read, from its header alone: the decoded source (at the DCT scale
    Pillow's ``draft`` picks, for a JPEG), what the conversion and resize hold besides
    (``_BESIDES``) and the decoder's own buffers (``_DECODER_BYTES``; for a progressive JPEG,
    libjpeg's buffer of every coefficient of the full-size image: 2 bytes each, 64 per 8x8
    block of each component, 6 bytes per pixel without chroma subsampling, 8 for CMYK).
    tests/test_imaging.py measures it against the peak of every accepted format."""
    width, height = probe.width, probe.height
    coefficients = width * height * (8 if probe.mode == "CMYK" else 6) if probe.progressive else 0
    if probe.format in SCALED_DECODE:  # other formats are decoded in full, then reduced
        scale = reduction(probe, min_side)
        width, height = math.ceil(width / scale), math.ceil(height / scale)
    per_pixel = _MODE_BYTES.get(probe.mode, 4) + _BESIDES + _DECODER_BYTES.get(probe.format, 0)
    return width * height * per_pixel + coefficients


def reduction(probe: Probe, min_side: int | None) -> int:
    """What ``decode`` (with ``min_side``) divides the image's sides by, from its header: for a
    JPEG the DCT scale Pillow's ``draft`` picks (1, 2, 4 or 8) for what ``_draft`` asks, for
    other formats ``_reduce``'s box factor; 1 for a full-size decode. One reduction, one set of
    pixels: models whose targets give the same one can share a decode."""
    width, height = probe.width, probe.height
    short = min(width, height)
    if not min_side:
        return 1
    if probe.format in SCALED_DECODE:
        if not draft_scales(short, min_side):
            return 1
        k = min_side / short  # as ``_draft`` asks, and as Pillow's draft answers
        asked = max(1, math.ceil(width * k)), max(1, math.ceil(height * k))
        fits = min(width // asked[0], height // asked[1])
        return next(s for s in (8, 4, 2, 1) if fits >= s)
    factor = short // (REDUCE_MARGIN * min_side)
    return factor if factor >= 2 else 1


def draft_scales(short_side: int, min_side: int) -> bool:
    """Whether ``decode`` may decode a JPEG with this short side at a reduced DCT scale."""
    return short_side >= 2 * min_side


def _draft(img: Image.Image, min_side: int) -> tuple[tuple[int, int], Box] | None:
    """JPEG only: decode at the smallest DCT scale (1/2, 1/4, 1/8) whose short side is still at
    least ``min_side`` (Pillow's ``draft``: libjpeg scales while decoding, far cheaper than a
    full decode of a phone photo followed by a resize). Returns the full size and the region of
    the scaled image that holds it, when it scaled: a side that is not a whole number of blocks
    is rounded up, and its last row or column covers only part of a pixel."""
    width, height = img.size
    short = min(width, height)
    if img.format not in SCALED_DECODE or not draft_scales(short, min_side):
        return None
    k = min_side / short
    scaled = img.draft(img.mode, (max(1, math.ceil(width * k)), max(1, math.ceil(height * k))))
    if scaled is None or img.size == (width, height):
        return None
    return (width, height), scaled[1]


def _upright(box: Box, size: tuple[int, int], orientation: object) -> Box:
    """Where the region ``box`` = (0, 0, w, h) of an image of ``size`` lies once the EXIF
    ``orientation`` (2-8, as ``ImageOps.exif_transpose`` applies it) has been applied."""
    width, height = size
    w, h = box[2], box[3]
    moved: dict[object, Box] = {
        2: (width - w, 0, width, h),  # mirrored left-right
        3: (width - w, height - h, width, height),  # rotated 180
        4: (0, height - h, w, height),  # mirrored top-bottom
        5: (0, 0, h, w),  # transposed
        6: (height - h, 0, height, w),  # rotated 90 clockwise
        7: (height - h, width - w, height, width),  # transversed
        8: (0, width - w, h, width),  # rotated 90 counter-clockwise
    }
    return moved.get(orientation, box)


REDUCE_MARGIN = 2


def _reduce(img: Image.Image, min_side: int) -> Image.Image:
    """Other formats than JPEG (PNG, WebP, GIF, TIFF, BMP): decoded in full, then averaged over
    k x k blocks (Pillow's ``reduce``, a box filter, cheaper than the antialiased resize of the
    full image), k the largest that keeps a short side of at least ``REDUCE_MARGIN`` times
    ``min_side``; the caller's resize then starts from that. A box filter aliases more than
    JPEG's DCT scaling: keeping only ``min_side`` (or the power of two below it, as JPEG does)
    moved top-1 of the real CIFAR-10 nets on 0.9-1.2% of upscaled PNGs, against the 1% bound.

    ``info["source_size"]`` records the full size and ``info["source_box"]`` the region of the
    reduced image that holds it (a side that is not a multiple of k is rounded up to a partial
    block)."""
    factor = min(img.size) // (REDUCE_MARGIN * min_side)
    if factor < 2:
        return img
    reduced = img.reduce(factor)
    reduced.info["source_size"] = img.size
    reduced.info["source_box"] = (0.0, 0.0, img.size[0] / factor, img.size[1] / factor)
    img.close()
    memory.after_large_buffer(img.size[0] * img.size[1] * 4)  # Pillow's RGB: 4 bytes a pixel
    return reduced


def decode(
    data: BytesLike,
    max_pixels: int,
    min_side: int | None = None,
    budget_s: float = DECODE_BUDGET_S,
    checked: bool = False,
) -> Image.Image:
    """Decode an upload to an RGB image with EXIF orientation applied.

    ``min_side``: the smallest short side the caller needs; a JPEG may then be decoded at a
    reduced DCT scale that keeps at least that much, and other formats are box-reduced by an
    integer factor that keeps ``REDUCE_MARGIN`` times that (None: full size, exact).

    Raises ImageError (400) for empty, unreadable or unsupported data, ImageBudgetError (400) for
    an image over a decode budget (structure, or ``budget_s`` of wall-clock time), and
    ImageTooLargeError (413) when the declared dimensions exceed ``max_pixels``. The first frame
    of a GIF or page of a TIFF is decoded (``open`` leaves the image there). ``checked``: the
    caller ran ``probe`` on ``data`` (its structure is not walked again).
    """
    img, source = _open(data, max_pixels, checked, budget_s)
    fmt = img.format
    img.decodermaxblock = READ_BLOCK  # type: ignore[attr-defined]  # how often it is checked
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            drafted = _draft(img, min_side) if min_side else None
            img.load()
            # the raw value, looked up as exif_transpose does (an ASCII "6" turns nothing)
            orientation = img.getexif().get(0x0112, 1) if drafted else 1
            scaled_size = img.size
            ImageOps.exif_transpose(img, in_place=True)  # no copy of an upright image
            rgb = _to_rgb(img, source.check)
            for key in SCALE_KEYS:  # ours only: a PNG's text chunks also land in ``info``
                rgb.info.pop(key, None)
            if drafted:  # the size a full decode would have had, and where it lies, upright
                full, box = drafted
                turned = orientation in (5, 6, 7, 8)
                rgb.info["source_size"] = full[::-1] if turned else full
                rgb.info["source_box"] = _upright(box, scaled_size, orientation)
    except ImageBudgetError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image dimensions are too large: {exc}") from None
    except MemoryError:
        raise ImageTooLargeError("image is too large to decode") from None
    except Exception as exc:  # truncated data, corrupt streams, unsupported compression
        raise ImageError(f"the image data cannot be decoded: {exc}") from None
    finally:
        source.close()  # let go of the upload's bytes
    if rgb is not img:
        img.close()  # free the pre-conversion pixels now, not when the collector gets to them
    if rgb.size[0] * rgb.size[1] > max_pixels:  # a TIFF page or GIF frame larger than declared
        raise ImageTooLargeError(f"image exceeds the {max_pixels:,}-pixel limit")
    if min_side and fmt not in SCALED_DECODE:
        rgb = _reduce(rgb, min_side)
    return rgb
