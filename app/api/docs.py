"""The API's documentation page, whole from the service: Swagger UI at ``/docs`` loads its script
and style from ``/static/docs`` (the fastapi-offline package's copies; FastAPI's own page loads
them from a CDN, and is blank where the service cannot reach the internet). No ReDoc: its
standalone script still loads its logo from a CDN. Open without the API key, like the page; with
``IMGCLS_API_KEY`` set the schema declares the bearer scheme, so Swagger UI's "Authorize" sends
the key with its requests."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.middleware import OPEN_PATHS, error_key

ASSETS = "/static/docs"
SCHEME = "apiKey"


def install(app: FastAPI, api_key: bool) -> None:
    """The page and its assets (mounted before any other ``/static``), on ``app`` built with
    ``docs_url=None, redoc_url=None``."""
    folder = resources.files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(folder)), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")  # behind a proxy that strips a prefix
        return f"{root}{app.openapi_url}", f"{root}{ASSETS}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        schema, assets = urls(request)
        return get_swagger_ui_html(
            openapi_url=schema,
            title=f"{app.title} - API",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            oauth2_redirect_url=None,
        )

    if api_key:
        build = app.openapi

        def keyed() -> dict[str, Any]:
            schema = build()  # built once and kept by FastAPI: marking it again changes nothing
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes[SCHEME] = {
                "type": "http",
                "scheme": "bearer",
                "description": "IMGCLS_API_KEY, sent as `Authorization: Bearer <key>`",
            }
            for path, operations in schema.get("paths", {}).items():
                key = error_key(path)
                for operation in operations.values():
                    if path in OPEN_PATHS:
                        operation["security"] = []
                        continue
                    operation["security"] = [{SCHEME: []}]
                    operation.setdefault("responses", {}).setdefault("401", {
                        "description": "Missing or wrong API key",
                        "content": {"application/json": {"schema": {
                            "type": "object",
                            "properties": {key: {"type": "string"}},
                            "required": [key],
                        }}},
                    })  # fmt: skip
            return schema

        app.openapi = keyed  # type: ignore[method-assign]
