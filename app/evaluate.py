"""`imgcls eval`: accuracy and latency per model on an ImageFolder tree, through the HTTP API.

It measures what users get: every image is uploaded to ``/classify`` of a running service (or of
one started in-process when no URL is given). Results go to ``report.json``, ``report.md`` (the
article's "ResNet variants" table, measured) and ``report.png`` (accuracy against latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class ModelReport:
    model: str
    family: str
    depth: int
    params: int | None
    gflops: float | None
    weights: str
    device: str
    precision: str
    images: int
    top1: float
    top5: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float
    skipped: int = 0  # files the service refused (400 unreadable, 413 over a limit): left out
    skipped_examples: list[str] = field(default_factory=list)  # the first few, with the reason


def list_images(data: Path, limit: int | None = None) -> list[tuple[Path, str]]:
    """(path, label) for an ImageFolder tree: one subfolder per class, named by its label, its
    images at any depth below it (as torchvision's ImageFolder finds them).

    With ``limit``, the first images of every class in turn, so a short run stays balanced.
    """
    classes = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{data} has no class subfolders")
    per_class = [sorted(_images_below(c)) for c in classes]
    if not any(per_class):
        raise ValueError(
            f"{data}'s class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    items: list[tuple[Path, str]] = []
    for row in range(max(len(files) for files in per_class)):
        for cls, files in zip(classes, per_class, strict=True):
            if row < len(files):
                items.append((files[row], cls.name))
    return items[:limit] if limit else items


def _images_below(folder: Path) -> list[Path]:
    """Image files at any depth below ``folder``, through links to folders, each folder once
    (a link to a folder above it made the walk go round until paths grew too long)."""
    found = []
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        # dot files: macOS's "._name.jpg" resource forks are not images
        for name in files:
            f = Path(root) / name
            if f.suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".") and f.is_file():
                found.append(f)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _auth() -> dict[str, str]:
    """The bearer token for a service started with IMGCLS_API_KEY (the same variable here)."""
    key = (os.environ.get("IMGCLS_API_KEY") or "").strip()  # as the service reads it
    return {"Authorization": f"Bearer {key}"} if key else {}


@contextlib.contextmanager
def local_service(models: list[str]) -> Iterator[str]:
    """A real uvicorn server on a free 127.0.0.1 port serving ``models``; yields its URL."""
    import uvicorn

    from app.main import create_app
    from app.service import check_startup
    from app.settings import Settings

    # HTTP only (no fixed port), and no API key: it serves this run alone, on 127.0.0.1
    settings = Settings(models=",".join(models), grpc_port=0, api_key=None)
    check_startup(settings)  # said in one line, before a server starts
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=600, models=models)
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


def wait_ready(url: str, timeout: float, models: Sequence[str] = ()) -> None:
    """Until ``/readyz`` says ready; at once (ValueError) when one of ``models`` cannot be: its
    weights are missing or it failed to load."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
            for model in models:
                entry = httpx.get(f"{url}/models/{model}", timeout=5, headers=_auth()).json()
                if entry.get("status") in ("failed", "missing-weights"):
                    raise ValueError(f"{model} cannot be served: {entry.get('reason')}")
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s: {last}")


# How long one image is retried while the service answers 503 (busy, or a worker restarting).
BUSY_RETRY_S = 60.0


def _retry_after(r: httpx.Response) -> float:
    """The wait a 503's Retry-After asks for (seconds, at most 10), else one second."""
    try:
        return min(10.0, max(0.1, float(r.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


async def _run_model(
    client: httpx.AsyncClient,
    model: str,
    items: list[tuple[Path, str]],
    concurrency: int,
    progress: Any,
) -> tuple[list[dict[str, Any]], float]:
    """Each image read when it is sent (a folder of ImageNet's size held whole took gigabytes)."""
    results: list[dict[str, Any]] = [{} for _ in items]
    next_index = 0

    async def one(i: int) -> None:
        path, label = items[i]
        name = path.name
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:  # removed or unreadable since the folder was listed
            results[i] = {"skipped": f"{name}: cannot read it ({exc.strerror or exc})"}
            progress.update(1)
            return
        given_up = time.monotonic() + BUSY_RETRY_S
        while True:
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    "/classify", params={"model": model, "top_k": 5}, files={"file": (name, data)}
                )
            except httpx.HTTPError as exc:  # the service went away, or stopped answering
                raise ValueError(
                    f"{model} on {name}: no answer from the service ({type(exc).__name__}: "
                    f"{exc or 'no detail'})"
                ) from None
            elapsed = (time.perf_counter() - t0) * 1000.0  # the answered try's own time
            # busy (a full queue, a worker restarting): retry as told, within BUSY_RETRY_S
            if r.status_code not in (429, 503) or time.monotonic() >= given_up:
                break
            await asyncio.sleep(_retry_after(r))
        if r.status_code in (400, 413):  # not an image the service takes: left out, counted
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:  # a proxy's own page
                detail = r.text[:200]
            results[i] = {"skipped": f"{name}: HTTP {r.status_code}: {detail}"}
            progress.update(1)
            return
        if r.status_code != 200:
            raise ValueError(f"{model} on {name}: HTTP {r.status_code}: {r.text[:500]}")
        body = r.json()
        labels = [p["label"] for p in body["predictions"]]
        results[i] = {"label": label, "labels": labels, "ms": elapsed, "body": body}
        progress.update(1)

    async def user() -> None:
        nonlocal next_index
        while next_index < len(items):
            i = next_index
            next_index += 1
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def _summarise(
    model: str, entry: dict[str, Any], answered: list[dict[str, Any]], wall_s: float
) -> ModelReport:
    results = [r for r in answered if "skipped" not in r]
    skipped = [r["skipped"] for r in answered if "skipped" in r]
    if not results:
        raise ValueError(
            f"{model}: no file could be evaluated (each unreadable, or refused by the service), "
            f"e.g. {skipped[0]}"
        )
    n = len(results)
    top1 = sum(r["labels"][0] == r["label"] for r in results)
    top5 = sum(r["label"] in r["labels"][:5] for r in results)
    ms = np.array([r["ms"] for r in results])
    first = results[0]["body"]
    return ModelReport(
        model=model,
        family=entry["family"],
        depth=entry["depth"],
        params=entry["params"],
        gflops=entry["gflops"],
        weights=first["weights"],
        device=first["device"],
        precision=first["precision"],
        images=n,
        top1=round(100.0 * top1 / n, 2),
        top5=round(100.0 * top5 / n, 2),
        images_per_s=round(n / wall_s, 2),
        p50_ms=round(float(np.percentile(ms, 50)), 2),
        p95_ms=round(float(np.percentile(ms, 95)), 2),
        p99_ms=round(float(np.percentile(ms, 99)), 2),
        mean_batch=round(float(np.mean([r["body"]["batch_size"] for r in results])), 2),
        skipped=len(skipped),
        skipped_examples=skipped[:3],
    )


READY_WAIT_S = 600.0  # a service just started may take minutes to load and compile its models


async def _ready_entry(client: httpx.AsyncClient, url: str, model: str) -> dict[str, Any]:
    """``/models/{model}`` once it is ready: a model still loading (a service just started) is
    waited for; one not served, failed or without weights ends the run (ValueError)."""
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        try:
            r = await client.get(f"/models/{model}")
        except httpx.HTTPError as exc:
            raise ValueError(f"cannot reach {url}: {exc}") from None
        if r.status_code != 200:
            raise ValueError(f"{url}: model {model!r}: {r.json().get('detail', r.text)}")
        entry: dict[str, Any] = r.json()
        status = entry.get("status")
        if status == "ready":
            return entry
        if status != "loading" or time.monotonic() > deadline:
            raise ValueError(
                f"{url}: model {model!r} is {status} ({entry.get('reason')}); serve it first"
            )
        await asyncio.sleep(0.5)


async def evaluate_url(
    url: str,
    data: Path,
    models: list[str],
    limit: int | None,
    concurrency: int,
    reports: list[ModelReport] | None = None,
) -> list[ModelReport]:
    """Each model in turn; its report is appended to ``reports`` (a new list if None) as soon as
    it is done, so a caller still holds the finished ones when a later model's run fails."""
    from tqdm import tqdm

    reports = [] if reports is None else reports
    items = list_images(data, limit)
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=_auth()) as client:
        entries = {}
        for model in models:
            entries[model] = await _ready_entry(client, url, model)
            unknown = sorted({label for _, label in items} - set(entries[model]["labels"]))
            if unknown:
                raise ValueError(
                    f"class folders {unknown[:5]} of {data} are not labels of {model}; "
                    "each subfolder must be named by one of the model's labels"
                )
        for model in models:
            with tqdm(total=len(items), desc=model, unit="img") as bar:
                results, wall = await _run_model(client, model, items, concurrency, bar)
            reports.append(_summarise(model, entries[model], results, wall))
    return reports


def write_reports(reports: list[ModelReport], out: Path, meta: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in reports]
    (out / "report.json").write_text(json.dumps({"meta": meta, "models": rows}, indent=2))
    lines = [
        f"# imgcls eval: {meta['data']}",
        "",
        f"{meta['images']} images per model, concurrency {meta['concurrency']}, via {meta['url']}.",
        "",
    ]
    if not meta.get("complete", True):
        cut = meta["incomplete"]
        lines += [
            f"**Incomplete**: the run stopped ({cut['reason']}); not evaluated: "
            f"{', '.join(cut['not_evaluated'])}.",
            "",
        ]
    lines += [
        "| model | family | depth | params (M) | GFLOPs | top-1 % | top-5 % | images/s "
        "| p50 ms | p95 ms | p99 ms | device | precision | weights |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in reports:
        params = f"{r.params / 1e6:.2f}" if r.params else "-"
        gflops = f"{r.gflops:.3g}" if r.gflops is not None else "-"
        lines.append(
            f"| {r.model} | {r.family} | {r.depth} | {params} | {gflops} | {r.top1:.2f} | "
            f"{r.top5:.2f} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | "
            f"{r.p99_ms:.1f} | {r.device} | {r.precision} | {r.weights} |"
        )
    for r in reports:
        if r.skipped:
            lines.append(f"\n{r.model}: {r.skipped} files were refused by the service and left "
                         f"out of its figures, e.g. {r.skipped_examples[0]}")  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(reports, out / "report.png")
    return [out / "report.json", out / "report.md", out / "report.png"]


def _plot(reports: list[ModelReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"cnn": ("s", "#d95f02", "plain CNN"), "resnet": ("o", "#1b9e77", "ResNet")}
    for family, (marker, color, label) in styles.items():
        pts = [r for r in reports if r.family == family]
        if pts:
            ax.scatter(
                [r.p50_ms for r in pts],
                [r.top1 for r in pts],
                marker=marker,
                c=color,
                s=60,
                label=label,
            )
            for r in pts:
                ax.annotate(
                    r.model,
                    (r.p50_ms, r.top1),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize=8,
                )
    ax.set_xlabel("median latency per image over HTTP (ms)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy against latency, measured")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_eval(
    data: Path,
    models: list[str],
    url: str | None,
    limit: int | None,
    concurrency: int,
    out: Path,
) -> list[ModelReport]:
    if not data.is_dir():
        raise ValueError(f"--data {data} is not a folder")
    if out.exists() and not out.is_dir():  # found now, not after the whole evaluation
        raise ValueError(f"--out {out} is a file; name a folder for the reports")
    if not models:
        raise ValueError("--models names no model")
    models = list(dict.fromkeys(models))  # a model named twice is evaluated once
    from app.benchmarks.common import check_out_folder

    check_out_folder(out, "--out")  # made as the reports are written: none for a refused run
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(local_service(models))
            shown_url = "in-process service"
        else:
            shown_url = url
        reports: list[ModelReport] = []  # filled model by model

        def meta(**more: Any) -> dict[str, Any]:
            return {
                "data": str(data),
                "images": reports[0].images if reports else 0,
                "concurrency": concurrency,
                "url": shown_url,
                "cpu_count": os.cpu_count(),
                **more,
            }

        try:
            asyncio.run(evaluate_url(url, data, models, limit, concurrency, reports))
        except (ValueError, KeyboardInterrupt) as exc:
            if not reports:  # nothing measured yet: nothing to keep
                raise
            # the models already measured are kept: a run of hours cut short loses only the
            # model it was on (the service went away, Ctrl-C)
            done = [r.model for r in reports]
            left = [m for m in models if m not in done]
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            write_reports(
                reports,
                out,
                meta(complete=False, incomplete={"reason": reason, "not_evaluated": left}),
            )
            kept = (
                f"the report of {', '.join(done)} is in {out} "
                f"(incomplete: {', '.join(left)} not evaluated)"
            )
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted(kept) from None
            raise ValueError(f"{exc}; {kept}") from None
    write_reports(reports, out, meta(complete=True))
    return reports


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``imgcls eval``, after the reports of the models finished were written."""
