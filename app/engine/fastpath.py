"""Which numeric precision, memory format and compiler a device gets by default.

Defaults are the fastest path that passed the accuracy guard (tests/test_fast_paths.py: top-1
agreement with fp32 eager >= 99% and accuracy within 5 of 1,000 images on real CIFAR-10 images):
fp16 on CUDA, bf16 on CPUs with AVX512-BF16 or AMX, fp32 elsewhere; channels_last and
torch.compile with reduced precision, and with ``auto`` precision on any CPU: where ``auto``
resolves to fp32 (no bf16 in hardware), the compiled channels-last graphs are the fastest
guarded path (resnet50 at batch 8 on an AVX2-only AMD EPYC: fp32 1.22-1.32x eager, int8 compiled
1.2-1.3x eager int8 across runs; bf16, emulated there, 8x slower than fp32). An explicit
``fp32`` stays eager unless compile is asked for. The choice follows the CPU's flags, never one
machine's timings: this project runs on Intel with AMX, on AMD EPYC with AVX512-BF16 and VNNI,
and on AMD EPYC with AVX2 only (no AVX-512: fp32, and int8 with 7-bit weights;
quantize._weight_range).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU flags that decide the fast paths (from the kernel's /proc/cpuinfo)."""

    amx_bf16: bool = False
    amx_int8: bool = False
    amx_tile: bool = False
    avx512_bf16: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False
    avx2: bool = False

    @property
    def bf16(self) -> bool:
        """bf16 matmuls in hardware: AVX512-BF16 or AMX."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def vnni(self) -> bool:
        """8-bit dot products without the 16-bit saturation of plain AVX2 (int8 kernels)."""
        return self.avx512_vnni or self.avx_vnni or self.amx_int8

    def names(self) -> list[str]:
        """The flags present, in a fixed order (for /info and the benchmark's machine block)."""
        return [f.name for f in fields(self) if getattr(self, f.name)]


def parse_cpu_flags(cpuinfo: str) -> CpuFeatures:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return CpuFeatures(**{f.name: f.name in flags for f in fields(CpuFeatures)})


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's CPU features (Linux; none where /proc/cpuinfo cannot be read)."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuFeatures()


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16, from the kernel's CPU flags (Linux)."""
    return cpu_features().bf16


@dataclass(frozen=True)
class FastPath:
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool


def resolve(
    precision: str, channels_last: bool | None, compile: bool | None, device: str
) -> FastPath:
    cuda = device.startswith("cuda")
    auto = precision == "auto"
    if auto:
        precision = "fp16" if cuda else ("bf16" if cpu_has_bf16() else "fp32")
    elif precision == "fp16" and not cuda:
        raise ValueError("fp16 runs only on CUDA; use bf16 or fp32 on the CPU")
    fast = precision != "fp32" or (auto and not cuda)
    return FastPath(
        precision=precision,
        channels_last=fast if channels_last is None else channels_last,
        compile=fast if compile is None else compile,
    )
