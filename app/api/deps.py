"""Shared route dependencies and the multipart request body as OpenAPI shows it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from app.service import Service


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
