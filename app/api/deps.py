"""Shared route dependencies and the multipart request body as OpenAPI shows it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from app.schemas import ErrorMessage, InvalidRequest
from app.service import Service

MAX_TOP_K = 20  # predictions a /classify or /compare answers at most (/info says so)


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

# Error answers as OpenAPI shows them: each with its body's schema (``{"detail": ...}``).
KEY_ERROR: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "missing or wrong API key (IMGCLS_API_KEY set)"},
}

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorMessage, "description": "empty or undecodable image"},
    **KEY_ERROR,
    404: {
        "model": ErrorMessage,
        "description": "unknown model (the message lists the available ones)",
    },
    408: {"model": ErrorMessage, "description": "the upload did not arrive in time"},
    413: {"model": ErrorMessage, "description": "upload or image too large"},
    415: {"model": ErrorMessage, "description": "body is not multipart/form-data"},
    422: {"model": InvalidRequest, "description": "invalid parameters or missing 'file' field"},
    500: {"model": ErrorMessage, "description": "server fault (the message names the request id)"},
    503: {
        "model": ErrorMessage,
        "description": "model not ready, queue or upload budget full, or the server stopping "
        "(see Retry-After)",
    },
    504: {"model": ErrorMessage, "description": "request deadline passed"},
}
