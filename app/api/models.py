"""GET /models."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.schemas import ModelsResponse

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelsResponse, summary="The catalog, with status per model")
async def list_models(service: ServiceDep) -> ModelsResponse:
    return ModelsResponse.model_validate({"models": service.model_entries()})
