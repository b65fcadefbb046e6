"""What every benchmarked server shares: the model, its weights and the JPEG uploads."""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image

# The folder the ``app`` package is in: servers started here import this imgcls, whatever the
# current folder holds (an installed wheel's site-packages, or a source checkout).
APP_DIR = str(Path(__file__).resolve().parents[2])
# The project's shared photos, beside a source checkout (not there for an installed wheel).
SHARED_IMAGES = Path(APP_DIR).parent / "shared" / "data" / "images"


# The servers `imgcls bench` can measure (their commands: harness._servers).
SERVERS = ("imgcls", "imgcls-int8", "naive", "litserve")


def check_plan(
    servers: tuple[str, ...],
    max_batch: int | None,
    model_seconds: float,
    images: Path | None,
    out: Path,
) -> Path:
    """The checks of a benchmark's arguments that need neither torch nor the model catalog:
    ValueError, in one line, for an unknown server, no batch limit to serve at, a folder of
    photos that is not there or a reports folder that cannot be made. The photos' folder."""
    unknown = [name for name in servers if name not in SERVERS]
    if unknown:
        raise ValueError(
            f"--servers: unknown {', '.join(unknown)}; choose from {', '.join(SERVERS)}"
        )
    if max_batch is None and model_seconds <= 0:
        raise ValueError("--model-seconds 0 (no model-only sweep) needs --max-batch")
    folder = photos(images)
    check_out_folder(out, "--out")  # made when the run starts (harness.run_bench)
    return folder


def photos(folder: Path | None = None) -> Path:
    """The folder of photos the upload sets are made from: ``folder``, else
    IMGCLS_BENCH_IMAGES, else the shared photos; ValueError, in one line, when it is not one."""
    chosen = folder or Path(os.environ.get("IMGCLS_BENCH_IMAGES") or SHARED_IMAGES)
    if not chosen.is_dir():
        raise ValueError(
            f"--images: no folder of photos at {chosen} (give --images or IMGCLS_BENCH_IMAGES: "
            "a folder of JPEG, PNG or other photos)"
        )
    return chosen


def _jpegs(
    folder: Path | None, quality: int, shape: Callable[[Image.Image], Image.Image]
) -> list[bytes]:
    """Every readable photo in ``folder`` (see ``photos``) as RGB, shaped by ``shape`` and
    encoded as a JPEG upload."""
    folder = photos(folder)
    out = []
    for path in sorted(folder.iterdir()):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except Exception:  # not an image, or one Pillow cannot read
            continue
        buf = io.BytesIO()
        shape(rgb).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    if not out:
        raise ValueError(f"--images: no readable images in {folder}")
    return out


def jpeg_corpus(folder: Path | None = None, quality: int = 90) -> list[bytes]:
    """Real photos as JPEG uploads of varied sizes (from IMGCLS_BENCH_IMAGES or shared data)."""
    return _jpegs(folder, quality, lambda img: img)


# Upload sets by size, generated from the shared photos: (width, height, JPEG quality). Small
# thumbnails, ImageNet's typical photo and a 12-megapixel phone photo; what a service decodes grows
# with the upload, so each is reported apart.
IMAGE_SETS: dict[str, tuple[int, int, int]] = {
    "small": (160, 120, 90),
    "imagenet": (500, 375, 90),
    "phone": (4032, 3024, 92),
}


def _fit(img: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop ``img`` to the aspect ratio width:height, then resize to exactly that size
    (photos taller than wide are turned to landscape first, as a phone's sensor records them)."""
    if img.height > img.width:
        img = img.transpose(Image.Transpose.ROTATE_90)
    aspect = width / height
    w, h = img.size
    if w / h > aspect:
        cw, ch = round(h * aspect), h
    else:
        cw, ch = w, round(w / aspect)
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    return img.resize((width, height), Image.Resampling.BICUBIC)


def image_set(name: str, folder: Path | None = None) -> list[bytes]:
    """The shared photos (or IMGCLS_BENCH_IMAGES) as JPEG uploads of one size (IMAGE_SETS)."""
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}; choose from {', '.join(IMAGE_SETS)}")
    width, height, quality = IMAGE_SETS[name]
    return _jpegs(folder, quality, lambda img: _fit(img, width, height))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    args: list[str], env: dict[str, str], health: str, timeout: float = 900
) -> subprocess.Popen[bytes]:
    """Start a server subprocess and wait until ``health`` answers 200."""
    # -P: not the current folder first on the path (python -m puts it there): the servers
    # import the imgcls this is part of. No API key: the load generator sends none (a key in
    # the caller's environment made every request a 401 and measured nothing).
    inherited = {k: v for k, v in os.environ.items() if k != "IMGCLS_API_KEY"}
    # APP_DIR first instead: a checkout run as `python -m app.cli`, not installed, works too
    inherited["PYTHONPATH"] = os.pathsep.join(filter(None, [APP_DIR, os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-P", *args],
        env={**inherited, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"server {args} exited with {proc.returncode}: {err[-2000:]}")
            try:
                if httpx.get(health, timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server {args} not healthy after {timeout:.0f}s")
    except BaseException:  # not healthy, or the benchmark itself is stopping (SIGTERM, ^C)
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def out_folder(out: Path, option: str) -> None:
    """Make the reports' folder ``out`` now, not after the whole run (ValueError if it cannot
    be made or written)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{option} {out}: cannot make the folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {out}: the folder cannot be written")


def check_out_folder(out: Path, option: str) -> None:
    """ValueError unless the reports' folder ``out`` could be made and written; nothing is made,
    so that a run refused later (its model, the service) leaves no empty folder behind."""
    target = Path(os.path.abspath(out))
    there = target
    while not os.path.lexists(there) and there != there.parent:
        there = there.parent
    # a file, or a dangling link, where the folder (or one above it) would be
    if not there.is_dir():
        why = os.strerror(errno.EEXIST if there == target else errno.ENOTDIR)
        raise ValueError(f"{option} {out}: cannot make the folder ({why})")
    if there != target:  # to be made below ``there``, which must be writable
        if not os.access(there, os.W_OK | os.X_OK):
            why = os.strerror(errno.EACCES)
            raise ValueError(f"{option} {out}: cannot make the folder ({why})")
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {out}: the folder cannot be written")
