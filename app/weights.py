"""Where checkpoints live and how they are downloaded and verified.

Reading a checkpoint into a model is the engine's part: app/engine/checkpoint.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from app.catalog import ModelSpec
from app.engine.checkpoint import WeightsError, load_into, read_state_dict

__all__ = ["WeightsError", "download", "load_into", "pull", "read_state_dict", "resolve", "status"]


def pull_command(name: str) -> str:
    return f"imgcls weights pull {name}"


def source_url(spec: ModelSpec, mirror: str | None = None) -> str:
    if not spec.weights_url:
        raise WeightsError(f"{spec.name} has no published weights to download")
    if mirror:
        return mirror.rstrip("/") + "/" + Path(spec.weights_url).name
    return spec.weights_url


def download(url: str, dest: Path, sha256_prefix: str | None, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` atomically, verifying the sha256 prefix when one is known.

    torch.hub's helper writes to a temporary file beside ``dest``, checks the hash and only then
    renames it into place; on any failure the temporary file is removed, so a partial or corrupted
    file never sits where the loader looks. Re-running when ``dest`` exists does nothing.
    """
    if dest.exists():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only volume, a path through a file: no retry will help
        raise WeightsError(
            f"cannot create the weights folder {dest.parent}: {exc}", problem="failed"
        ) from exc
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha256_prefix, progress=progress)
    except PermissionError as exc:
        raise WeightsError(f"cannot write {dest}: {exc}", problem="failed") from exc
    except Exception as exc:  # network errors, HTTP errors, hash mismatch
        raise WeightsError(f"download of {url} failed: {exc}") from exc
    return dest


def pull(
    spec: ModelSpec, weights_dir: Path, mirror: str | None = None, progress: bool = True
) -> Path:
    path = spec.weights_path(weights_dir)
    if path is None:
        raise WeightsError(f"{spec.name} has no published weights to download")
    return download(source_url(spec, mirror), path, spec.sha256_prefix, progress=progress)


@dataclass(frozen=True)
class WeightsStatus:
    name: str
    file: str | None
    present: bool
    size_bytes: int | None


def status(spec: ModelSpec, weights_dir: Path) -> WeightsStatus:
    path = spec.weights_path(weights_dir)
    if path is None:
        return WeightsStatus(spec.name, None, False, None)
    present = path.is_file()
    return WeightsStatus(spec.name, str(path), present, path.stat().st_size if present else None)


def resolve(
    spec: ModelSpec,
    weights_dir: Path,
    *,
    auto_download: bool,
    allow_random: bool,
    mirror: str | None = None,
) -> Path | None:
    """The checkpoint to load for ``spec``, downloading it if allowed.

    Returns None when random weights are to be used; raises WeightsError when the model cannot be
    served, with the command that fixes it.
    """
    path = spec.weights_path(weights_dir)
    if path is not None and path.is_file():
        return path
    problem = "has no published weights" if path is None else f"weights not found at {path}"
    if path is not None and auto_download and spec.weights_url:
        try:
            return pull(spec, weights_dir, mirror=mirror, progress=False)
        except WeightsError as exc:
            if exc.problem == "failed" and not allow_random:
                raise WeightsError(f"{spec.name}: {exc}", problem="failed") from exc
            problem = f"weights not found at {path} and {exc}"
    if allow_random:
        return None
    fix = (
        f"run `{pull_command(spec.name)}`"
        if spec.weights_url
        else "provide a checkpoint through IMGCLS_MODEL_CONFIG"
    )
    raise WeightsError(
        f"{spec.name}: {problem}; {fix} (or set IMGCLS_ALLOW_RANDOM_WEIGHTS=1 for development)"
    )


def weights_label(spec: ModelSpec, path: Path | None) -> str:
    """What a response's ``weights`` says: the enum member for torchvision weights, the file for
    other checkpoints, ``random`` without one."""
    if path is None:
        return "random"
    if spec.source == "torchvision" and spec.weights_name:
        return spec.weights_name
    return path.name
