"""Generated test images: odd-but-valid ones and hostile ones."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A deterministic RGB image with structure (gradients), not flat colour."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge image (one compressed row of zeros)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def gif_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A GIF whose logical screen and frame declare a huge size."""
    raw = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    raw[6:10] = struct.pack("<HH", width, height)
    i = raw.index(b",")  # image descriptor
    raw[i + 5 : i + 9] = struct.pack("<HH", width, height)
    return bytes(raw)


def jpeg_bomb(width: int = 65_000, height: int = 65_000) -> bytes:
    """A JPEG whose SOF header declares a huge size."""
    raw = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    i = raw.index(b"\xff\xc0")
    raw[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def exif_rotated(orientation: int = 6) -> bytes:
    img = photo((120, 60))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def jpeg_scan_bomb(repeats: int = 2000, size: int = 6000) -> bytes:
    """Issue 16's progressive-JPEG CPU bomb: a 16x16 progressive JPEG, its SOF2 patched to say
    ``size`` x ``size``, its SOS...EOI segment (10 scans) appended ``repeats`` times, then EOI.
    The default (590 KB, 20,010 scans) took a minute to decode on a 2-core EPYC."""
    raw = bytearray(encode(Image.new("RGB", (16, 16), (120, 30, 200)), "JPEG", progressive=True))
    sof = raw.index(b"\xff\xc2")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", size, size)
    sos, eoi = raw.index(b"\xff\xda"), raw.rindex(b"\xff\xd9")
    return bytes(raw[:eoi]) + bytes(raw[sos:eoi]) * repeats + b"\xff\xd9"


def jpeg_marker_flood(segments: int = 100_000) -> bytes:
    """A small JPEG behind ``segments`` empty comment segments, which Pillow parses in Python."""
    jpeg = encode(photo(), "JPEG")
    return jpeg[:2] + b"\xff\xfe\x00\x02" * segments + jpeg[2:]


def png_chunk_flood(chunks: int = 100_000) -> bytes:
    """A small PNG with ``chunks`` empty private chunks before its image data."""
    png = encode(photo(), "PNG")
    after_ihdr = 8 + 25
    return png[:after_ihdr] + png_chunk(b"prVt", b"") * chunks + png[after_ihdr:]


def gif_block_flood(blocks: int = 100_000) -> bytes:
    """A small GIF with ``blocks`` empty comment extensions before its first image."""
    gif = encode(Image.new("P", (10, 10)), "GIF")
    first_image = gif.index(b",")
    return gif[:first_image] + b"\x21\xfe\x00" * blocks + gif[first_image:]


def tiff_strips(width: int, height: int, shared: bool = False, kind: int = 4) -> bytes:
    """An uncompressed greyscale TIFF (little-endian) in one-row strips: ``height`` strip offsets.
    ``shared``: every strip points at the same row of data, so the file stays small however many
    strips it declares. ``kind``: the field type of the offsets and byte counts, LONG (4 bytes
    each) or BYTE (1: one byte each, every strip at offset 0; a flood, not an image)."""
    size = {4: 4, 1: 1}[kind]
    entries = 9
    ifd = 8
    data = ifd + 2 + 12 * entries + 4
    rows = 1 if shared else height
    offsets = data + width * rows
    counts = offsets + size * height

    def tag(code: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", code, kind, count, value)

    fields = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),  # uncompressed
        (262, 3, 1, 1), (273, kind, height, offsets), (277, 3, 1, 1), (278, 4, 1, 1),
        (279, kind, height, counts),
    ]  # fmt: skip
    directory = struct.pack("<H", entries) + b"".join(tag(*f) for f in fields) + bytes(4)
    pixels = bytes(i % 251 for i in range(width * rows))
    if kind == 1:
        return b"II*\x00" + struct.pack("<I", ifd) + directory + pixels + bytes(height) * 2
    starts = [data + (0 if shared else r * width) for r in range(height)]
    return (
        b"II*\x00" + struct.pack("<I", ifd) + directory + pixels
        + struct.pack(f"<{height}I", *starts) + struct.pack(f"<{height}I", *[width] * height)
    )  # fmt: skip


def eps(size: int) -> bytes:
    """An Encapsulated PostScript file of about ``size`` bytes (a header, then text lines)."""
    head = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    return head + (b"a" * 100 + b"\n") * (size // 101)
