"""GET /models."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import KEY_ERROR, ServiceDep
from app.schemas import ErrorMessage, ModelDetail, ModelsResponse

router = APIRouter(tags=["models"])


@router.get(
    "/models",
    response_model=ModelsResponse,
    responses=KEY_ERROR,
    summary="The catalog, with status per model",
)
async def list_models(service: ServiceDep) -> ModelsResponse:
    return ModelsResponse.model_validate({"models": service.model_entries()})


@router.get(
    "/models/{name}",
    response_model=ModelDetail,
    responses={**KEY_ERROR, 404: {"model": ErrorMessage, "description": "unknown model"}},
    summary="One catalog entry, with its labels",
)
async def get_model(name: str, service: ServiceDep) -> ModelDetail:
    return ModelDetail.model_validate(service.model_entry(name))
