"""Read an image upload from a request body, in memory, never past the size limit, held once.

The body is streamed into one buffer (preallocated from Content-Length) and counted, so an
oversized upload is refused with 413 as soon as it passes the limit (or at once from its
Content-Length). The multipart form is parsed in memory with python-multipart, off the event loop
and bounded (parts, header lines and their sizes); the file part is handed on as a view into that
buffer, not copied. Uploads are never written to disk.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import UploadError, UploadTooLargeError
from app.imaging import BytesLike
from app.text import clip

FIELD = "file"
FORM_OVERHEAD = 64 * 1024  # boundaries and part headers around the file
MAX_PARTS = 16  # the form needs one part; a few more (a name, a caption) are tolerated
MAX_PART_HEADERS = 8  # header lines per part (python-multipart's default)
MAX_PART_HEADER_BYTES = 4096  # one header line
# Below this a body is parsed on the event loop: a thread hop costs more than the parse.
_PARSE_INLINE_BYTES = 8 * 1024


@dataclass
class Upload:
    data: BytesLike  # a view into the request body: the upload is held once
    filename: str | None
    content_type: str | None
    received: float = 0.0  # time.perf_counter() when the body was in (before its parse)


def _mb(limit: int) -> str:
    return f"{limit / 1048576:g}"


async def read_body(request: Request, limit: int, setting_limit: int | None = None) -> bytearray:
    """The whole body, in one buffer, refused past ``limit`` bytes (413). ``setting_limit`` is
    the configured upload limit the message names (default ``limit``)."""
    setting = _mb(setting_limit if setting_limit is not None else limit)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise UploadError("invalid Content-Length header") from None
        if declared_n < 0:
            raise UploadError("invalid Content-Length header")
        if declared_n > limit:
            raise UploadTooLargeError(
                f"upload is {declared_n:,} bytes; the limit is {setting} MB "
                f"(IMGCLS_MAX_UPLOAD_MB={setting})"
            )
        return await _read_declared(request, declared_n)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise UploadTooLargeError(
                f"upload is over the limit of {setting} MB (IMGCLS_MAX_UPLOAD_MB={setting})"
            )
        body += chunk
    return body


async def _read_declared(request: Request, size: int) -> bytearray:
    """Fill a buffer of the declared size in place (the server enforces that the body is exactly
    Content-Length bytes long)."""
    body = bytearray(size)
    view = memoryview(body)
    got = 0
    try:
        async for chunk in request.stream():
            end = got + len(chunk)
            if end > size:
                raise UploadError("the body is longer than its Content-Length")
            view[got:end] = chunk
            got = end
    finally:
        view.release()
    if got < size:
        del body[got:]
    return body


def _parse_multipart(body: bytearray, boundary: bytes, file_limit: int) -> Upload:
    """The ``file`` part of a multipart body. Raises UploadError (400/422) or 413."""
    parts: list[tuple[dict[bytes, bytes], BytesLike]] = []
    headers: dict[bytes, bytes] = {}
    header_field = bytearray()
    header_value = bytearray()
    # The part's data as ranges of ``body`` (no copy), or copied where the parser hands over
    # bytes of its own (the look-behind of a partial boundary match).
    spans: list[tuple[int, int]] = []
    copied: bytearray | None = None
    size = 0
    in_part = False  # a part has begun and not ended: a body cut off ends inside one

    def on_part_begin() -> None:
        nonlocal headers, copied, size, in_part
        if len(parts) >= MAX_PARTS:
            raise UploadError(f"the multipart form has more than {MAX_PARTS} parts")
        in_part = True
        headers = {}
        spans.clear()
        copied, size = None, 0

    def on_header_field(b: bytes, start: int, end: int) -> None:
        header_field.extend(b[start:end])

    def on_header_value(b: bytes, start: int, end: int) -> None:
        header_value.extend(b[start:end])

    def on_header_end() -> None:
        headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(b: bytes, start: int, end: int) -> None:
        nonlocal copied, size
        size += end - start
        if size > file_limit:
            raise UploadTooLargeError(
                f"file is over the limit of {_mb(file_limit)} MB "
                f"(IMGCLS_MAX_UPLOAD_MB={_mb(file_limit)})"
            )
        if copied is None and b is body and (not spans or spans[-1][1] == start):
            if spans:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
            return
        if copied is None:  # the data stops being one range of the body: copy from here on
            copied = bytearray().join(body[a:z] for a, z in spans)
        copied.extend(b[start:end])

    def on_part_end() -> None:
        nonlocal in_part
        in_part = False
        data: BytesLike
        if copied is not None:
            data = copied
        elif spans:
            data = memoryview(body)[spans[0][0] : spans[0][1]]
        else:
            data = b""
        parts.append((headers, data))

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )
        parser.write(body)  # type: ignore[arg-type]  # bytearray has every method it uses
        parser.finalize()
    except (UploadTooLargeError, UploadError):
        raise
    except Exception as exc:  # FormParserError, MultipartParseError, a boundary too long, ...
        raise UploadError(f"malformed multipart body: {clip(str(exc))}") from None
    if in_part:
        raise UploadError(
            "the multipart body ends inside a part, before its closing boundary "
            "(a truncated upload?)"
        )

    for part_headers, payload in parts:
        disposition = part_headers.get(b"content-disposition", b"")
        _, params = parse_options_header(disposition)
        if params.get(b"name") != FIELD.encode():
            continue
        raw_name = params.get(b"filename")
        filename = raw_name.decode("utf-8", "replace") if raw_name is not None else None
        ctype = part_headers.get(b"content-type")
        return Upload(payload, filename, ctype.decode("latin-1") if ctype else None)
    raise UploadError(f"the multipart form has no '{FIELD}' field with the image", status=422)


async def read_upload(request: Request, limit: int) -> Upload:
    """The image from a ``multipart/form-data`` body's ``file`` field (at most ``limit``
    bytes). ``.data`` is a view into the body: the upload is held in memory once."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise UploadError(
            f"send the image as multipart/form-data in a field named '{FIELD}' "
            f"(got Content-Type {clip(ctype.decode('latin-1')) or 'none'})",
            status=415,
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError("multipart/form-data without a boundary")
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):  # image files are compressed already
        raise UploadError(
            f"Content-Encoding {clip(coding)!r} is not taken for uploads: send the form as it is",
            status=415,
        )
    body = await read_body(request, limit + FORM_OVERHEAD, setting_limit=limit)
    received = time.perf_counter()
    if len(body) <= _PARSE_INLINE_BYTES:
        upload = _parse_multipart(body, boundary, limit)
    else:  # off the event loop: headers are parsed byte by byte in Python
        upload = await asyncio.to_thread(_parse_multipart, body, boundary, limit)
    upload.received = received
    return upload
