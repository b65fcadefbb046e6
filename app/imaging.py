"""Bytes -> RGB image. Every input limit on images lives here.

The header is read first and the pixel count checked before any pixel is decoded, so a
decompression bomb is never expanded.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"}
ACCEPTED_DESCRIPTION = "JPEG, PNG, WebP, BMP, GIF or TIFF"

ImageFile.LOAD_TRUNCATED_IMAGES = False

# Resizing the short side of a 1x10000 strip to 256 pixels would make 2.5 million columns: an
# extreme aspect ratio is a memory bomb of its own, so it is refused like an oversized image.
MAX_ASPECT_RATIO = 50


class ImageError(ValueError):
    """The upload is not an image this service accepts (HTTP 400)."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed (HTTP 413)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        # 16-bit (or 32-bit integer) grey: scale to 8 bits rather than clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = np.nan_to_num((arr - lo) * scale).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in {"RGBA", "LA", "PA", "La", "RGBa"}:
        # Composite transparency on white, as a viewer shows it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class Probe:
    """What the header says, read without decoding a pixel."""

    format: str
    mode: str
    width: int
    height: int
    orientation: int  # EXIF orientation, 1 when absent

    @property
    def plain_jpeg(self) -> bool:
        """A JPEG that a tensor decoder (torchvision.io, nvjpeg) gives exactly as Pillow does:
        RGB or grey, upright (no EXIF rotation to apply), a single frame."""
        return self.format == "JPEG" and self.mode in ("RGB", "L") and self.orientation == 1


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open and check the header: format, dimensions, pixel count, aspect ratio."""
    if not data:
        raise ImageError("the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.format  # noqa: B018 - the header is parsed by open()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image dimensions are too large: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"the upload is not a readable image; accepted formats: {ACCEPTED_DESCRIPTION}"
        ) from None
    except Exception as exc:  # Pillow raises a variety of errors on malformed headers
        raise ImageError(f"the image header cannot be read: {exc}") from None

    if img.format not in ACCEPTED_FORMATS:
        raise ImageError(
            f"image format {img.format} is not accepted; accepted formats: {ACCEPTED_DESCRIPTION}"
        )
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
    return img


def probe(data: bytes, max_pixels: int) -> Probe:
    """Check an upload's header (the same checks as ``decode``, same errors) without decoding.

    Cheap enough for the event loop; what passes is decoded later, in a worker.
    """
    img = _open(data, max_pixels)
    try:
        orientation = int(img.getexif().get(0x0112, 1)) if img.format == "JPEG" else 1
    except Exception:  # a malformed EXIF block: let the full decoder deal with the image
        orientation = 0
    return Probe(str(img.format), img.mode, img.size[0], img.size[1], orientation)


def _draft(img: Image.Image, min_side: int) -> tuple[int, int] | None:
    """JPEG only: decode at the smallest DCT scale (1/2, 1/4, 1/8) whose short side is still at
    least ``min_side`` (Pillow's ``draft``: libjpeg scales while decoding, far cheaper than a
    full decode of a phone photo followed by a resize). Returns the full size when it scaled."""
    width, height = img.size
    short = min(width, height)
    if img.format != "JPEG" or short < 2 * min_side:
        return None
    k = min_side / short
    img.draft(img.mode, (max(1, math.ceil(width * k)), max(1, math.ceil(height * k))))
    return (width, height) if img.size != (width, height) else None


def decode(data: bytes, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Decode an upload to an RGB image with EXIF orientation applied.

    ``min_side``: the smallest short side the caller needs; a JPEG may then be decoded at a
    reduced DCT scale that keeps at least that much (None: full size, exact).

    Raises ImageError (400) for empty, unreadable or unsupported data and ImageTooLargeError (413)
    when the declared dimensions exceed ``max_pixels``.
    """
    img = _open(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            source = _draft(img, min_side) if min_side else None
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # first frame of a GIF, first page of a TIFF
            img.load()
            rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8) if source else False
            rgb = _to_rgb(ImageOps.exif_transpose(img) or img)
            if source:  # the size a full decode would have had, upright
                rgb.info["source_size"] = source[::-1] if rotated else source
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image dimensions are too large: {exc}") from None
    except MemoryError:
        raise ImageTooLargeError("image is too large to decode") from None
    except Exception as exc:  # truncated data, corrupt streams, unsupported compression
        raise ImageError(f"the image data cannot be decoded: {exc}") from None
    if rgb.size[0] * rgb.size[1] > max_pixels:  # a TIFF page or GIF frame larger than declared
        raise ImageTooLargeError(f"image exceeds the {max_pixels:,}-pixel limit")
    return rgb
