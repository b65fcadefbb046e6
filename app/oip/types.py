"""The protocol's requests and answers, as the data plane sees them whatever door they came in by.

Leaf module: the codecs (REST JSON/binary, gRPC messages) build and read these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# the models' input and output tensors, and the datatype each input takes
IMAGE, PIXELS, PROBABILITIES = "IMAGE", "PIXELS", "PROBABILITIES"
INPUT_DATATYPES = {IMAGE: "BYTES", PIXELS: "FP32"}

TensorData = np.ndarray[Any, Any] | list[bytes]  # numeric elements (flat), or BYTES elements
# An input's BYTES elements may be views into the request body: an upload is held once.
InputData = np.ndarray[Any, Any] | list[bytes] | list[memoryview]


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: InputData
    text: bool = False  # BYTES that came as JSON strings (IMAGE elements are then base64)


@dataclass
class OutputRequest:
    name: str
    classification: int = 0  # top-k as BYTES "<score>:<index>:<label>"; 0 = the tensor itself
    binary: bool = False  # REST: answer with the binary tensor data extension


@dataclass
class InferRequest:
    model: str
    version: str | None
    id: str | None
    inputs: list[InputTensor]
    outputs: list[OutputRequest] | None = None  # None: every output
    binary_outputs: bool = False  # REST parameter binary_data_output


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: TensorData
    binary: bool = False


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[OutputTensor] = field(default_factory=list)
