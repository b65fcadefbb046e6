"""imaging.decode: conversions, EXIF orientation and limits, without the HTTP layer."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from app import imaging
from app.imaging import ImageError, ImageTooLargeError, decode
from tests import images
from tests.conftest import IMAGES, ROOT, needs_shared

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


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_the_pixel_limit_is_the_setting_not_pillows(fmt):
    """The 413 names IMGCLS_MAX_PIXELS' figure, and a limit above Pillow's own (89.5 MP)
    takes effect: Pillow's check ran first, named 89,478,485, and refused 100 MP whatever the
    setting."""
    bomb = getattr(images, f"{fmt}_bomb")
    with pytest.raises(ImageTooLargeError, match=f"the limit is {LIMIT:,}"):
        imaging.probe(bomb(10_000, 10_000), LIMIT)
    with pytest.raises(ImageTooLargeError, match=f"the limit is {LIMIT:,}"):
        imaging.probe(bomb(20_000, 20_000), LIMIT)
    probe = imaging.probe(bomb(10_000, 10_000), 200_000_000)  # 100 MP within a 200 MP setting
    assert (probe.width, probe.height) == (10_000, 10_000)


def _padded(jpeg: bytes, padding: bytes) -> bytes:
    """``padding`` between the JPEG's start-of-image marker and its first segment, after a
    0xFF (Pillow takes a file for a JPEG by its first three bytes, 0xFF 0xD8 0xFF)."""
    return jpeg[:2] + b"\xff" + padding + jpeg[2:]


@needs_shared(IMAGES)
@pytest.mark.parametrize("byte", [b"\x00", b"\xff"], ids=["junk", "fill"])
def test_padding_in_a_jpeg_header_is_bounded(byte):
    """Bytes between a JPEG's header segments (junk, or 0xFF fill) are skipped by Pillow one
    read at a time in Python, ~0.65 s per MB in the API process and again in the worker: a
    few are accepted (decoded as without them), megabytes refused unread."""
    jpeg = (IMAGES / "hubble_deep_field.jpg").read_bytes()  # a real photo's header
    plain = np.asarray(decode(jpeg, LIMIT))
    few = _padded(jpeg, byte * 1000)
    assert np.array_equal(np.asarray(decode(few, LIMIT)), plain)
    for size in (imaging.MAX_JPEG_PADDING + 1, 2 * 1024 * 1024):
        with pytest.raises(imaging.ImageBudgetError, match="junk or fill"):
            imaging.probe(_padded(jpeg, byte * size), LIMIT)
        with pytest.raises(imaging.ImageBudgetError, match="junk or fill"):
            decode(_padded(jpeg, byte * size), LIMIT)
    # junk and fill together, in small pieces between every segment, count as one
    spread = bytearray(jpeg)
    header_end = jpeg.index(b"\xff\xda")  # the first scan
    markers = [i for i in range(2, header_end) if jpeg[i] == 0xFF and jpeg[i + 1] not in (0, 0xFF)]
    for at in reversed(markers):
        spread[at:at] = b"\xff" + b"\x00" * 20_000 + b"\xff" * 20_000
    with pytest.raises(imaging.ImageBudgetError, match="junk or fill"):
        imaging.probe(bytes(spread), LIMIT)


def test_the_budget_counts_the_header_parse(monkeypatch):
    """The decode budget runs from the open: Pillow's header parse (Python) is part of it."""
    monkeypatch.setattr(imaging, "MAX_JPEG_PADDING", 10 * 1024 * 1024)  # let the padding in
    slow = _padded(images.encode(images.photo(), "JPEG"), b"\x00" * 3 * 1024 * 1024)
    with pytest.raises(imaging.ImageBudgetError, match="budget"):
        decode(slow, LIMIT, budget_s=0.05)


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


def _conversion_cases(h: int, w: int) -> dict[str, tuple[bytes, np.ndarray]]:
    """Uploads whose pixels need more than Pillow's convert to become RGB, each with the RGB
    pixels the whole image gives by the reference arithmetic (grey scaled or stretched to 8 bits,
    transparency composited on white)."""
    rng = np.random.default_rng(0)
    cases = {}
    deep = rng.integers(0, 65536, (h, w)).astype(np.uint16)
    grey = np.clip(np.rint(deep * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    cases["I;16"] = (images.encode(Image.fromarray(deep), "PNG"), grey)
    big_endian = Image.frombytes("I;16B", (w, h), deep.astype(">u2").tobytes())
    cases["I;16B"] = (images.encode(big_endian, "TIFF"), grey)  # reopens as I;16B
    ints = rng.integers(-1000, 100_000, (h, w)).astype(np.int32)
    grey = np.clip(np.rint(ints * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    cases["I"] = (images.encode(Image.fromarray(ints, "I"), "TIFF"), grey)
    floats = rng.normal(size=(h, w)).astype(np.float32)
    floats[1, 2] = floats[h - 1, w - 1] = np.nan
    lo, hi = np.nanmin(floats.astype(np.float64)), np.nanmax(floats.astype(np.float64))
    grey = np.nan_to_num((floats.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    cases["F"] = (images.encode(Image.fromarray(floats, "F"), "TIFF"), grey)

    def on_white(img: Image.Image) -> np.ndarray:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, img.convert("RGBA")).convert("RGB"))

    palette = Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8), "L").convert("P")
    palette.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tobytes())
    alpha = bytes(rng.integers(0, 256, 256).astype(np.uint8))
    palette.info["transparency"] = alpha
    cases["P+tRNS"] = (images.encode(palette, "PNG", transparency=alpha), on_white(palette))
    for mode, bands in (("LA", 2), ("RGBA", 4)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, bands)).astype(np.uint8), mode)
        cases[mode] = (images.encode(img, "PNG"), on_white(img))
    for key, (data, want) in cases.items():
        if want.ndim == 2:
            cases[key] = (data, np.repeat(want[..., None], 3, axis=2))
    return cases


@pytest.mark.parametrize("case", ["I;16", "I;16B", "I", "F", "P+tRNS", "LA", "RGBA"])
def test_deep_float_and_transparent_images_convert_strip_by_strip_as_a_whole(case, monkeypatch):
    """These conversions run a strip of rows at a time (bounded memory); the strips, here 5 rows
    of 53 pixels and a last one of 2, give the pixels the whole image gives."""
    monkeypatch.setattr(imaging, "STRIP_PIXELS", 5 * 53)
    data, want = _conversion_cases(37, 53)[case]
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == case.removesuffix("+tRNS")  # the mode the case is named for
    got = np.asarray(decode(data, LIMIT))
    assert got.shape == want.shape and (got == want).all()


def test_a_conversion_stops_when_its_budget_runs_out(monkeypatch):
    """The decode budget's clock is read between strips: an overrun stops the conversion."""
    monkeypatch.setattr(imaging, "STRIP_PIXELS", 53)
    img = Image.fromarray(np.zeros((37, 53), dtype=np.uint16))
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise imaging.ImageBudgetError("over budget")

    with pytest.raises(imaging.ImageBudgetError):
        imaging._to_rgb(img, check)
    assert len(calls) == 3


# bytes per pixel Pillow holds a decoded image of each mode in
_STORED = {"RGB": 4, "I;16": 2, "F": 4, "P+tRNS": 1, "LA": 4, "RGBA": 4}

_PEAK = """
import re, sys
from app.imaging import decode
data = open(sys.argv[1], "rb").read()
status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1])
before = status("VmRSS")
img = decode(data, 40_000_000)
print(img.size, (status("VmHWM") - before) * 1024)
"""


@pytest.mark.parametrize("case", list(_STORED))
def test_small_uploads_decode_in_the_memory_of_their_pixels(case, tmp_path):
    """A 5 KB palette PNG with a transparent colour, or a 16-bit grey PNG, at 16 megapixels used
    to peak at 5-8 times its RGB pixels (float64 arrays, RGBA copies and composites of the
    whole image: ~1 GB at the 40-megapixel limit). Decoding now peaks at the decoded source plus
    its RGB result, as a plain RGB PNG does (+64 MB for a strip's temporaries and the
    interpreter), in a process of its own."""
    side = 4000
    upload = {
        "RGB": lambda: images.encode(Image.new("RGB", (side, side), (10, 200, 30)), "PNG"),
        "I;16": lambda: images.encode(Image.fromarray(np.full((side, side), 40000, np.uint16)), "PNG"),
        "F": lambda: images.encode(Image.new("F", (side, side), 0.5), "TIFF", compression="tiff_adobe_deflate"),
        "P+tRNS": lambda: images.encode(Image.new("P", (side, side)), "PNG", transparency=0),
        "LA": lambda: images.encode(Image.new("LA", (side, side), (100, 128)), "PNG"),
        "RGBA": lambda: images.encode(Image.new("RGBA", (side, side), (200, 10, 10, 128)), "PNG"),
    }[case]()  # fmt: skip
    assert len(upload) < 300_000
    path = tmp_path / "upload"
    path.write_bytes(upload)
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()  # fmt: skip
    size, peak = out[-3:-1], int(out[-1])
    assert size == ["(4000,", "4000)"]
    pixels = side * side
    bound = pixels * (_STORED[case] + _STORED["RGB"]) + 64 * 2**20
    print(f"{case}: upload {len(upload):,} B, decode peak {peak / 2**20:.0f} MB "
          f"(bound {bound / 2**20:.0f} MB)")  # fmt: skip
    assert peak <= bound


_PEAK_BOUND = """
import re, sys
from app import imaging, memory
from app.catalog import build_catalog
from app.engine.decoding import decode_pixels, draft_side
transforms = {0: build_catalog().get("resnet50").transform}
status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1])
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    probe = imaging.probe(data, 40_000_000)
    for draft in (True, False):
        bound = imaging.peak_bytes(probe, draft_side(transforms) if draft else None)
        memory.trim()
        open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
        before = status("VmRSS")
        decode_pixels(data, 40_000_000, transforms, draft, checked=True)
        print(path, draft, (status("VmHWM") - before) * 1024, bound)
"""


def _photo_jpeg(size: tuple[int, int], **save: object) -> bytes:
    photo = Image.open(IMAGES / "astronaut.png").convert("RGB").resize(size)
    return images.encode(photo, "JPEG", quality=90, **save)


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: decoded, then turned upright
    return _photo_jpeg((4032, 3024), exif=exif)


def _cmyk_jpeg() -> bytes:
    photo = Image.open(IMAGES / "astronaut.png").convert("CMYK").resize((3000, 3000))
    return images.encode(photo, "JPEG", quality=90)


def _photo(mode: str, size: tuple[int, int]) -> Image.Image:
    return Image.open(IMAGES / "astronaut.png").convert(mode).resize(size)


_BOUND_CASES = {
    "jpeg": lambda: _photo_jpeg((4032, 3024)),
    "grey jpeg": lambda: images.encode(_photo("L", (4000, 3000)), "JPEG", quality=90),
    "webp": lambda: images.encode(_photo("RGB", (3000, 2000)), "WEBP", quality=80),
    "gif": lambda: images.encode(_photo("P", (3000, 2000)), "GIF"),
    "grey png": lambda: images.encode(_photo("L", (3000, 2000)), "PNG"),
    "bmp": lambda: images.encode(_photo("RGB", (3000, 2000)), "BMP"),
    "16-bit tiff": lambda: images.encode(
        Image.fromarray(np.full((2000, 3000), 40000, np.uint16)),
        "TIFF",
        compression="tiff_adobe_deflate",
    ),
    "progressive jpeg": lambda: _photo_jpeg((4032, 3024), progressive=True),
    "rotated jpeg": _rotated_jpeg,
    "cmyk jpeg": _cmyk_jpeg,
    "rgb png": lambda: images.encode(Image.new("RGB", (4000, 4000), (10, 200, 30)), "PNG"),
    "16-bit png": lambda: images.encode(
        Image.fromarray(np.full((4000, 4000), 40000, np.uint16)), "PNG"
    ),
    "palette png": lambda: images.encode(Image.new("P", (4000, 4000)), "PNG", transparency=0),
}


@needs_shared(IMAGES)
def test_the_header_bounds_what_a_decode_holds(tmp_path):
    """``imaging.peak_bytes``, read from the header alone, is what the API process reserves of
    IMGCLS_DECODE_MEMORY_MB before a decode: each decode and resize, in a process of their own,
    peaks within it (+32 MB for the interpreter's own), with and without IMGCLS_JPEG_DRAFT."""
    paths = []
    for n, make in enumerate(_BOUND_CASES.values()):
        paths.append(tmp_path / f"upload-{n}")
        paths[-1].write_bytes(make())
    out = subprocess.run([sys.executable, "-c", _PEAK_BOUND, *map(str, paths)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True).stdout  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.startswith(str(tmp_path))]
    assert len(rows) == 2 * len(_BOUND_CASES)
    for (_path, draft, peak, bound), case in zip(
        rows, [c for c in _BOUND_CASES for _ in "de"], strict=True
    ):
        print(f"{case}, {'draft' if draft == 'True' else 'exact'}: peak {int(peak) / 2**20:.0f} MB, "
              f"bound {int(bound) / 2**20:.0f} MB")  # fmt: skip
        assert int(peak) <= int(bound) + 32 * 2**20, (case, draft)


@pytest.mark.parametrize("between", [b"\xff\xff\xff", b"\x00\x01junk"], ids=["fill", "junk"])
def test_the_scan_cap_counts_past_padding_after_a_scan(between):
    """Fill or junk after a scan (after a segment that ends where no marker follows) does not
    end the walk: the scans after it are still counted, and a file of 2,000 scans refused."""
    bomb = images.jpeg_scan_bomb()
    with pytest.raises(imaging.ImageBudgetError, match="scans"):
        imaging.check_structure(bomb)
    first_scan = bomb.index(b"\xff\xda")
    after = imaging._JPEG_NEXT_MARKER.search(bomb, first_scan + 4).start()  # its data's end
    comment = b"\xff\xfe\x00\x04ab"  # a COM segment, then the padding, then the next marker
    padded = bomb[:after] + comment + between + bomb[after:]
    with pytest.raises(imaging.ImageBudgetError, match="scans"):
        imaging.check_structure(padded)
