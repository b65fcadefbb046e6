"""Decode cost at the limits the service accepts, and of what it refuses (issue 16).

For each file: its size, the time ``imaging.probe`` takes (the API process, before accepting it)
and the time ``imaging.decode`` takes (the worker), best of three, and the decode time per byte
and per megapixel. The worst accepted decode time per byte is the README's figure.

    python bench/decode_budget.py
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import imaging
from tests import images

MAX_PIXELS = 40_000_000
PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "astronaut.png"


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def photo_40mp() -> Image.Image:
    src = Image.open(PHOTO).convert("RGB") if PHOTO.is_file() else images.photo((512, 512))
    arr = np.asarray(src.resize((7300, 5470))).astype(np.int16)
    arr += np.random.default_rng(0).integers(-6, 7, arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def declared_large_jpeg(width: int, height: int) -> bytes:
    """8x8 pixels of data behind a header that declares width x height: decode time is bound
    by the declared pixels, not by the bytes."""
    raw = bytearray(images.encode(Image.new("RGB", (8, 8)), "JPEG"))
    i = raw.index(b"\xff\xc0")
    raw[i + 5 : i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(raw)


def main() -> None:
    big = photo_40mp()
    png = images.encode(images.photo(), "PNG")
    idat = png.index(b"IDAT") - 4
    cases: dict[str, bytes] = {
        "JPEG 6000x6000, 100 scans (the scan limit)": images.jpeg_scan_bomb(repeats=9),
        "JPEG 6324x6324, 8x8 of data (pixel limit)": declared_large_jpeg(6324, 6324),
        "JPEG, 990 comment segments": images.jpeg_marker_flood(990),
        "PNG, 19,990 empty IDAT chunks": png[:idat]
        + images.png_chunk(b"IDAT", b"") * 19_990
        + png[idat:],
        "PNG, 995 private chunks": images.png_chunk_flood(995),
        "GIF, 9,990 comment blocks": images.gif_block_flood(9_990),
        "JPEG 40 MP photo q85": images.encode(big, "JPEG", quality=85),
        "JPEG 40 MP photo q85 progressive": images.encode(
            big, "JPEG", quality=85, progressive=True
        ),
        "PNG 40 MP photo (level 1)": images.encode(big, "PNG", compress_level=1),
        "WebP 40 MP photo q80": images.encode(big, "WEBP", quality=80),
        "refused: issue 16's bomb (2,000 repeats)": images.jpeg_scan_bomb(),
        "refused: JPEG, 100,000 comment segments": images.jpeg_marker_flood(),
        "refused: PNG, 100,000 private chunks": images.png_chunk_flood(),
    }
    print(f"{'file':<44} {'bytes':>11} {'probe ms':>9} {'decode s':>9} {'us/byte':>9} {'ms/MP':>7}")
    worst = (0.0, "")
    for name, data in cases.items():
        probe_s = best(lambda d=data: _try(imaging.probe, d))
        if name.startswith("refused"):
            outcome = _try(imaging.probe, data)
            print(f"{name:<44} {len(data):>11,} {probe_s * 1e3:>9.2f}   {outcome}")
            continue
        with Image.open(io.BytesIO(data)) as img:
            megapixels = img.size[0] * img.size[1] / 1e6
        decode_s = best(lambda d=data: imaging.decode(d, MAX_PIXELS))
        per_byte = decode_s / len(data) * 1e6
        worst = max(worst, (per_byte, name))
        print(
            f"{name:<44} {len(data):>11,} {probe_s * 1e3:>9.2f} {decode_s:>9.3f} "
            f"{per_byte:>9.2f} {decode_s * 1e3 / megapixels:>7.1f}"
        )
    print(f"worst accepted decode time per byte: {worst[0]:.0f} us ({worst[1]})")


def _try(fn, data: bytes) -> str:
    try:
        fn(data, MAX_PIXELS)
    except imaging.ImageError as exc:
        return f"refused: {exc}"[:70]
    return "accepted"


if __name__ == "__main__":
    main()
