"""The demo page (app/static): ``/`` and its script and style under ``/static``, for the
service (app/main.py) and for Ray Serve's ingress (app/ray_app.py). Open without the API key:
the page asks for it when a call is refused."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"


def install(app: FastAPI) -> None:
    """Mounts the page on ``app`` (after ``docs.install``: its ``/static/docs`` comes first)."""
    if not STATIC.is_dir():
        return
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")
