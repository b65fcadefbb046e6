"""Shared route dependencies and the multipart request body as OpenAPI shows it."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import Depends, Request
from PIL import Image

from app import imaging
from app.service import Service
from app.settings import Settings
from app.upload import read_upload


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def request_id(request: Request) -> str:
    rid: str = request.state.request_id
    return rid


RequestIdDep = Annotated[str, Depends(request_id)]


UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JPEG, PNG, WebP, BMP, GIF or TIFF image",
                        }
                    },
                }
            }
        },
    }
}

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "empty or undecodable image"},
    404: {"description": "unknown model (the message lists the available ones)"},
    413: {"description": "upload or image too large"},
    415: {"description": "body is not multipart/form-data"},
    422: {"description": "invalid parameters or missing 'file' field"},
    503: {"description": "model not ready or queue full (see Retry-After)"},
    504: {"description": "request deadline passed"},
}


async def read_image(request: Request, settings: Settings) -> tuple[Image.Image, float]:
    """Read and decode the upload off the event loop; returns the image and decode time (ms)."""
    upload = await read_upload(request, settings.max_upload_bytes)
    t0 = time.perf_counter()
    image = await asyncio.to_thread(imaging.decode, upload.data, settings.max_pixels)
    return image, (time.perf_counter() - t0) * 1000.0
