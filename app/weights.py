"""Where checkpoints live, how they are downloaded and verified, and how they are loaded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.catalog import ModelSpec


class WeightsError(RuntimeError):
    """A checkpoint is missing, cannot be fetched, or does not match its model."""


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
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=sha256_prefix, progress=progress)
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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint on the CPU with ``weights_only=True``.

    Accepts a bare state_dict or ``{"state_dict": ...}`` and strips DataParallel ``module.``
    prefixes.
    """
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model`` strictly; a mismatch names the keys and shapes."""
    state = read_state_dict(path)
    own = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise WeightsError(f"{path}: shape mismatch: " + "; ".join(wrong[:5]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: keys do not match the model: {exc}") from exc


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
