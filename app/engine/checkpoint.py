"""Reading checkpoints into models, on the CPU with ``weights_only=True``.

The engine's side of weights: where a file comes from (download, verification) is app/weights.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class WeightsError(RuntimeError):
    """A checkpoint is missing, cannot be fetched or written, or does not match its model.

    ``problem`` is the model status it leads to: ``missing-weights`` (fetch it and retry) or
    ``failed`` (something on this machine must change first, e.g. an unwritable weights folder).
    """

    def __init__(self, message: str, problem: str = "missing-weights") -> None:
        super().__init__(message)
        self.problem = problem


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
    if not isinstance(obj, Mapping) or not all(_state_value(v) for v in obj.values()):
        raise WeightsError(f"{path} is not a state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    metadata = getattr(obj, "_metadata", None)
    if metadata is None:
        return state
    # Module versions: quantized layers read their state_dict by the version that saved it.
    kept = OrderedDict(state)
    kept._metadata = OrderedDict(  # type: ignore[attr-defined]
        (k.removeprefix("module."), v) for k, v in metadata.items()
    )
    return kept


def _state_value(v: object) -> bool:
    """A tensor; or, in int8 state_dicts, a quantized linear layer's packed ``(weight, bias)``
    and its ``dtype``."""
    if isinstance(v, torch.Tensor | torch.dtype):
        return True
    return isinstance(v, tuple) and all(x is None or isinstance(x, torch.Tensor) for x in v)


def load_into(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model`` strictly; a mismatch names the keys and shapes."""
    state = read_state_dict(path)
    own = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
        and isinstance(own.get(k), torch.Tensor)
        and own[k].shape != v.shape
    ]
    if wrong:
        raise WeightsError(f"{path}: shape mismatch: " + "; ".join(wrong[:5]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: keys do not match the model: {exc}") from exc
