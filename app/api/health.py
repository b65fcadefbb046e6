"""GET /healthz (alive) and GET /readyz (every configured model loaded and warmed up)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app import __version__
from app.api.deps import KEY_ERROR, MAX_TOP_K, ServiceDep
from app.engine import fastpath
from app.schemas import Health, Info, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "some models are not ready"}},
    summary="200 when every configured model is loaded and warmed up",
)
async def readyz(service: ServiceDep) -> JSONResponse:
    ready, not_ready = service.is_ready()
    body = Readiness(ready=ready, not_ready=not_ready).model_dump()
    return JSONResponse(
        body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"}
    )


@router.get(
    "/info",
    response_model=Info,
    responses=KEY_ERROR,
    summary="Limits and defaults, for clients and the page",
)
async def info(service: ServiceDep) -> Info:
    s = service.settings
    return Info(
        version=__version__,
        default_model=s.default,
        models=list(service.served),
        max_upload_mb=s.max_upload_mb,
        max_pixels=s.max_pixels,
        max_top_k=MAX_TOP_K,
        devices=service.devices,
        cpu_features=fastpath.cpu_features().names(),
    )
