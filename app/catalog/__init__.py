"""What a backbone is: a registry of model specs built on torchvision's model API."""

from app.catalog.registry import Catalog, ModelSpec, UnknownModelError, build_catalog

__all__ = ["Catalog", "ModelSpec", "UnknownModelError", "build_catalog"]
