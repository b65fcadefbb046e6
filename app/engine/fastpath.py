"""Which numeric precision, memory format and compiler a device gets by default.

Defaults are the fastest path that passed the accuracy guard (tests/test_fast_paths.py: top-1
agreement with fp32 eager >= 99% and accuracy within 5 of 1,000 images on real CIFAR-10 images):
fp16 on CUDA, bf16 on CPUs with AVX512-BF16 or AMX, fp32 elsewhere; channels_last and
torch.compile with reduced precision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16, from the kernel's CPU flags (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool({"avx512_bf16", "amx_bf16"} & flags)


@dataclass(frozen=True)
class FastPath:
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool


def resolve(
    precision: str, channels_last: bool | None, compile: bool | None, device: str
) -> FastPath:
    cuda = device.startswith("cuda")
    if precision == "auto":
        precision = "fp16" if cuda else ("bf16" if cpu_has_bf16() else "fp32")
    elif precision == "fp16" and not cuda:
        raise ValueError("fp16 runs only on CUDA; use bf16 or fp32 on the CPU")
    reduced = precision != "fp32"
    return FastPath(
        precision=precision,
        channels_last=reduced if channels_last is None else channels_last,
        compile=reduced if compile is None else compile,
    )
