"""Realistic users of imgcls, for locust.

    make loadtest     # headless, bounded users and time, against the local service
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000

Images: real photos of varied sizes from IMGCLS_LOADTEST_IMAGES (default ../shared/data/images),
sent as JPEG uploads. Models: those the service reports ready in /models, so the mix follows the
deployment (override with IMGCLS_LOADTEST_MODELS=a,b,c). A service started with IMGCLS_API_KEY:
the same variable here sends it as a bearer token. When the models cannot be learnt (the
service is down, or refuses the key) the run stops at once with the reason (exit code 1).
"""

from __future__ import annotations

import io
import json
import os
import random
import urllib.error
import urllib.request
from pathlib import Path

import gevent
from locust import HttpUser, between, events, task
from locust.exception import StopUser

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parents[1] / "shared" / "data" / "images"
IMAGES_DIR = Path(os.environ.get("IMGCLS_LOADTEST_IMAGES", DEFAULT_IMAGES))


def _load_images() -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type) for every image file in IMAGES_DIR.

    Where Pillow is installed (the project's venv) they are re-encoded as JPEG uploads; without it
    (the locust container) the files are sent as they are.
    """
    try:
        from PIL import Image
    except ImportError:
        Image = None  # type: ignore[assignment]
    out = []
    for path in sorted(IMAGES_DIR.iterdir()) if IMAGES_DIR.is_dir() else []:
        if Image is None:
            kind = KNOWN_TYPES.get(path.suffix.lower())
            if kind:
                out.append((path.name, path.read_bytes(), kind))
            continue
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except Exception:  # not an image Pillow can read: skip it
            continue
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=90)
        out.append((path.stem + ".jpg", buf.getvalue(), "image/jpeg"))
    if not out:
        raise RuntimeError(f"no images found in {IMAGES_DIR} (set IMGCLS_LOADTEST_IMAGES)")
    return out


KNOWN_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
}
IMAGES = _load_images()
MODELS: list[str] = []
API_KEY = os.environ.get("IMGCLS_API_KEY") or None
HEADERS = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


@events.test_start.add_listener
def discover_models(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    """Use the models the service has ready (or IMGCLS_LOADTEST_MODELS)."""
    forced = os.environ.get("IMGCLS_LOADTEST_MODELS")
    if forced:
        MODELS[:] = [m.strip() for m in forced.split(",") if m.strip()]
        return
    request = urllib.request.Request(f"{environment.host}/models", headers=HEADERS)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            models = json.load(r)["models"]
        MODELS[:] = [m["name"] for m in models if m["status"] == "ready"]
        why = "" if MODELS else "it has no ready models"
    except urllib.error.HTTPError as exc:
        why = f"GET /models answered {exc.code}" + (
            " (set IMGCLS_API_KEY to the service's key)" if exc.code == 401 else ""
        )
    except (OSError, ValueError, KeyError) as exc:
        why = f"GET /models failed: {exc}"
    if why:  # nothing to send: stop now, not after RUN_TIME of tracebacks
        print(f"imgcls load test: cannot learn the models of {environment.host}: {why}")
        environment.process_exit_code = 1
        gevent.spawn(environment.runner.quit)  # once the start in progress has returned


class ImgclsUser(HttpUser):
    """Mostly single classifications across backbones, some comparisons, a few catalog reads."""

    wait_time = between(0.2, 1.5)  # think time between a user's requests

    def on_start(self) -> None:
        if not MODELS:  # the run is stopping (see discover_models)
            raise StopUser()
        self.client.headers.update(HEADERS)

    @task(10)
    def classify(self) -> None:
        name, data, kind = random.choice(IMAGES)
        model = random.choice(MODELS)
        with self.client.post(
            "/classify",
            params={"model": model, "top_k": 5},
            files={"file": (name, data, kind)},
            name="/classify?model=[model]",
            catch_response=True,
        ) as r:
            if r.status_code == 200 and len(r.json()["predictions"]) >= 1:
                r.success()
            elif r.status_code == 503:
                r.failure("503 overloaded or not ready")
            else:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

    @task(3)
    def compare(self) -> None:
        if len(MODELS) < 2:
            return
        name, data, kind = random.choice(IMAGES)
        models = random.sample(MODELS, k=min(len(MODELS), random.randint(2, 4)))
        with self.client.post(
            "/compare",
            params={"models": ",".join(models)},
            files={"file": (name, data, kind)},
            name="/compare?models=[2-4]",
            catch_response=True,
        ) as r:
            if r.status_code == 200 and len(r.json()["results"]) == len(models):
                r.success()
            else:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

    @task(1)
    def models(self) -> None:
        self.client.get("/models")
