"""Shared route dependencies and the multipart request body as OpenAPI shows it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from fastapi import Depends, Request

from app import imaging
from app.catalog import ModelSpec
from app.catalog.preprocess import Preprocess
from app.engine.decoding import Encoded, decode_pixels
from app.service import Service
from app.settings import Settings
from app.upload import read_upload


# Dependencies are ``async def``: FastAPI runs plain ``def`` ones in its thread pool, a thread hop
# per request for a dictionary lookup.
async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def request_id(request: Request) -> str:
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


@dataclass
class Pixels:
    """An upload decoded and resized for a set of models."""

    by_key: dict[tuple[object, ...], torch.Tensor]  # ModelSpec.transform_key -> uint8 (3, S, S)
    decode_ms: float
    preprocess_ms: float

    def of(self, spec: ModelSpec) -> torch.Tensor:
        return self.by_key[spec.transform_key]


def _prepare(data: imaging.BytesLike, max_pixels: int, transforms: dict[Any, Preprocess]) -> Pixels:
    return Pixels(*decode_pixels(data, max_pixels, transforms))


async def read_encoded(request: Request, settings: Settings) -> Encoded:
    """Read the upload and check its header (format, size, pixel limit: the same 4xx answers as
    decoding); the worker decodes it (IMGCLS_DECODE=worker)."""
    upload = await read_upload(request, settings.max_upload_bytes)
    # Header only (~0.1 ms), but off the event loop all the same: a crafted file can make a
    # header long to parse (thousands of PNG text chunks, deep TIFF directories).
    probe = await asyncio.to_thread(imaging.probe, upload.data, settings.max_pixels)
    return Encoded(upload.data, probe.plain_jpeg)


async def read_pixels(request: Request, settings: Settings, specs: list[ModelSpec]) -> Pixels:
    """Read the upload, then decode it and resize it once per distinct geometry among ``specs``,
    in one trip to a thread (decoding and resizing release the GIL)."""
    upload = await read_upload(request, settings.max_upload_bytes)
    transforms = {s.transform_key: s.transform for s in specs}
    return await asyncio.to_thread(_prepare, upload.data, settings.max_pixels, transforms)
