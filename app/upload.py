"""Read an image upload from a request body, in memory, never past the size limit.

The body is streamed and counted, so an oversized upload is refused with 413 as soon as it passes
the limit (or at once from its Content-Length), and the multipart form is parsed in memory with
python-multipart: uploads are never written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from app.errors import UploadError, UploadTooLargeError

FIELD = "file"
_FORM_OVERHEAD = 64 * 1024  # boundaries and part headers around the file


@dataclass
class Upload:
    data: bytes
    filename: str | None
    content_type: str | None


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise UploadError("invalid Content-Length header") from None
        if declared_n > limit:
            raise UploadTooLargeError(
                f"upload is {declared_n:,} bytes; the limit is {limit:,} bytes "
                f"(IMGCLS_MAX_UPLOAD_MB={limit / 1048576:g})"
            )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadTooLargeError(f"upload is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_multipart(body: bytes, boundary: bytes, file_limit: int) -> Upload:
    parts: list[dict[str, object]] = []
    current: dict[str, object] = {}
    header_field = bytearray()
    header_value = bytearray()
    data = bytearray()

    def on_part_begin() -> None:
        current.clear()
        current["headers"] = {}
        data.clear()

    def on_header_field(b: bytes, start: int, end: int) -> None:
        header_field.extend(b[start:end])

    def on_header_value(b: bytes, start: int, end: int) -> None:
        header_value.extend(b[start:end])

    def on_header_end() -> None:
        headers = current["headers"]
        assert isinstance(headers, dict)
        headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(b: bytes, start: int, end: int) -> None:
        data.extend(b[start:end])
        if len(data) > file_limit:
            raise UploadTooLargeError(f"file is over the limit of {file_limit:,} bytes")

    def on_part_end() -> None:
        current["data"] = bytes(data)
        parts.append(dict(current))

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
    )
    try:
        parser.write(body)
        parser.finalize()
    except UploadTooLargeError:
        raise
    except Exception as exc:
        raise UploadError(f"malformed multipart body: {exc}") from None

    for part in parts:
        headers = part["headers"]
        assert isinstance(headers, dict)
        disposition = headers.get(b"content-disposition", b"")
        _, params = parse_options_header(disposition)
        if params.get(b"name") != FIELD.encode():
            continue
        raw_name = params.get(b"filename")
        filename = raw_name.decode("utf-8", "replace") if raw_name is not None else None
        ctype = headers.get(b"content-type")
        payload = part["data"]
        assert isinstance(payload, bytes)
        return Upload(payload, filename, ctype.decode("latin-1") if ctype else None)
    raise UploadError(f"the multipart form has no '{FIELD}' field with the image", status=422)


async def read_upload(request: Request, limit: int) -> Upload:
    """The image from a ``multipart/form-data`` body's ``file`` field."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise UploadError(
            f"send the image as multipart/form-data in a field named '{FIELD}' "
            f"(got Content-Type {ctype.decode('latin-1') or 'none'})",
            status=415,
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError("multipart/form-data without a boundary")
    body = await read_body(request, limit + _FORM_OVERHEAD)
    return _parse_multipart(body, boundary, limit)
