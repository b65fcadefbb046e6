"""imaging.decode: conversions, EXIF orientation and limits, without the HTTP layer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.imaging import ImageError, ImageTooLargeError, decode
from tests import images

LIMIT = 40_000_000


def test_exif_orientation_is_applied():
    img = decode(images.exif_rotated(6), LIMIT)
    assert img.size == (60, 120)  # 120x60 stored, rotated 90 degrees for display


def test_grayscale_becomes_rgb():
    img = decode(images.encode(images.photo().convert("L"), "PNG"), LIMIT)
    assert img.mode == "RGB"
    r, g, b = (np.asarray(img)[..., c] for c in range(3))
    assert (r == g).all() and (g == b).all()


def test_rgba_is_composited_on_white():
    transparent = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    img = decode(images.encode(transparent, "PNG"), LIMIT)
    assert img.getpixel((5, 5)) == (255, 255, 255)


def test_palette_gif_with_transparency_first_frame():
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    data = images.encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    img = decode(data, LIMIT)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 0, 0)


def test_16bit_grey_is_scaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    img16 = Image.fromarray(arr)
    img = decode(images.encode(img16, "PNG"), LIMIT)
    assert img.getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg_becomes_rgb():
    img = decode(images.encode(images.photo().convert("CMYK"), "JPEG"), LIMIT)
    assert img.mode == "RGB"


def test_multipage_tiff_uses_first_page():
    pages = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (0, 255, 0))]
    data = images.encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert decode(data, LIMIT).getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "PNG", "JPEG", "GIF", "TIFF"])
def test_accepted_formats(fmt):
    assert decode(images.encode(images.photo(), fmt), LIMIT).size == (96, 64)


@pytest.mark.parametrize(
    "bomb", [images.png_bomb(), images.gif_bomb(), images.jpeg_bomb()], ids=["png", "gif", "jpeg"]
)
def test_decompression_bombs_are_refused_before_decoding(bomb):
    assert len(bomb) < 10_000
    with pytest.raises(ImageTooLargeError):
        decode(bomb, LIMIT)


def test_pixel_limit_applies():
    with pytest.raises(ImageTooLargeError, match="limit"):
        decode(images.encode(images.photo((100, 100)), "PNG"), 9_999)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is text",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"%PDF-1.4\n%\xe2\xe3",
        b"PK\x03\x04" + b"\x00" * 40,
    ],
    ids=["empty", "text", "svg", "pdf", "zip"],
)
def test_not_images_are_refused(data):
    with pytest.raises(ImageError):
        decode(data, LIMIT)


def test_truncated_image_is_refused():
    data = images.encode(images.photo((200, 200)), "PNG")
    with pytest.raises(ImageError):
        decode(data[: len(data) // 2], LIMIT)


def test_unsupported_format_is_refused():
    data = images.encode(images.photo(), "PPM")
    with pytest.raises(ImageError, match="not a readable image in an accepted format"):
        decode(data, LIMIT)


@pytest.mark.parametrize("size", [(1, 10_000), (10_000, 1), (3, 2000)])
def test_extreme_aspect_ratios_are_refused(size):
    data = images.encode(Image.new("L", size), "PNG")
    with pytest.raises(ImageError, match="aspect ratio"):
        decode(data, LIMIT)


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (2, 100), (64, 1)])
def test_tiny_images_are_fine(size):
    assert decode(images.encode(Image.new("RGB", size), "PNG"), LIMIT).size == size
