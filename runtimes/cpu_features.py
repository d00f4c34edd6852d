"""What this CPU's int8 kernels in ONNX Runtime do, from its feature flags.

ORT's dynamic int8 MatMul multiplies uint8 activations by int8 weights. On x86 without VNNI, MLAS does it
with VPMADDUBSW, which adds two u8*s8 products into an int16 with saturation: 2 * 255 * 127 overflows, and
outputs come out wrong by a large margin (onnxruntime's quantization docs warn about it). With VNNI
(AVX512-VNNI, AVX-VNNI or AMX-INT8), VPDPBUSD accumulates in int32 and nothing saturates. Weights
quantized to 7 bits (``reduce_range``) keep 2 * 255 * 64 inside int16 on every x86 CPU, at half the weight
resolution. Other architectures (ARM's SDOT/UDOT) accumulate in int32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The feature flags of this CPU as Linux reports them (empty when unknown, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def u8s8_saturates(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True when ORT's u8 x s8 int8 kernels on this CPU can saturate (x86 without VNNI, or unknown x86).

    >>> u8s8_saturates(frozenset({"avx2"}), "x86_64"), u8s8_saturates(frozenset({"avx2", "avx512_vnni"}), "x86_64")
    (True, False)
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    flags = cpu_flags() if flags is None else flags
    return not any(flag in flags for flag in VNNI_FLAGS)


def int8_kernel_path() -> str:
    """A short name for the path ORT's dynamic int8 MatMul takes here, for reports and test ids."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return f"{platform.machine().lower()}-int32-accumulate"
    return "x86-u8s8-saturating" if u8s8_saturates() else "x86-vnni"
