"""How a worker builds one model: a picklable plan that crosses the process boundary.

A leaf of the import graph: the catalog makes plans, the engine runs them, neither imports the
other through this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from app.preprocess import Preprocess


@dataclass(frozen=True)
class LoadPlan:
    name: str
    builder: Callable[[], nn.Module]
    weights_path: str | None  # None: random initialisation (explicitly allowed)
    input_size: int
    num_classes: int
    preprocess: Preprocess  # geometry (for uploads decoded in the worker) and normalisation
    arch: str = ""  # for the default Grad-CAM layer of an explanation
    cam_layer: str | None = None  # the Grad-CAM layer; None: by architecture
    # None: the worker's precision. "int8": a quantized model, built by ``builder`` (published
    # int8 weights) or, with ``calibration`` (a folder of images), quantized after loading.
    precision: str | None = None
    calibration: str | None = None
