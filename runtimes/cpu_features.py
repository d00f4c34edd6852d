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
import os
import platform
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask where the OS has one (a container's or taskset's
    limit), else every core the OS reports."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


# Measured on the 2-core AMD EPYC (Zen 5, AVX512-VNNI), one thread, ORT 1.32, a [1024 x 2816] MatMulNBits
# (benchmarks/kernels.py): block 128 against block 32 decodes (M=1) 1.4x faster at int4 and 1.2x at int8, and
# prefills (M=128) 1.35x / 1.3x faster; accuracy level 4 (int8 products) against 0: 3.7x at int4, and 8-bit
# weights have no fast fp32 kernel at all (70x slower).
INT4_BLOCK = 128
# int8 keeps q8_0's block of 32 all the same: at level 4 the kernel also quantizes the activations, one scale per
# block, and at block 128 that costs llama-pydoc 2.3x q8_0's KL divergence from fp32 (0.000187 against 0.000080);
# at 32 it is q8_0's (docs/precision.md), and it is the int8 block whose kernels are batch-invariant on the CPUs
# measured (runtimes/batch_invariance.py), so a served request equals itself alone. The price is speed: its
# kernel decodes 1.15x slower, and on a Zen 4 EPYC luffy's int8 decoded 0.84-0.89x q8_0 at 156M and 0.96x at the
# 1B shape (docs/benchmarks.md). --block-size 128 stays one flag away.
INT8_BLOCK = 32


def weight_kernels(flags: frozenset[str] | None = None, machine: str | None = None, bits: int = 4) -> dict:
    """The MatMulNBits kernel settings for ``bits``-bit (8 or 4) weights on this CPU: block size, accuracy
    level, and why.

    ONNX Runtime's MLAS runs a block-quantized MatMul with int8 products (accuracy level 4) on x86 with AVX2
    (VPMADDUBSW; VPDPBUSD where VNNI or AMX is there) and on ARM64 (SDOT / I8MM); larger blocks spend less of
    each dot product on scales. Elsewhere the fp32 path (level 0) is the one kept for int4.

    >>> [weight_kernels(frozenset({"avx2", "avx512_vnni"}), "x86_64", bits)["block_size"] for bits in (4, 8)]
    [128, 32]
    """
    machine = (machine or platform.machine()).lower()
    flags = cpu_flags() if flags is None else flags
    if machine in ("x86_64", "amd64"):
        dot = next((f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in flags), "avx2" if "avx2" in flags else None)
    else:
        dot = machine if machine in ("aarch64", "arm64") else None
    if dot is None:
        return {"cpu": machine, "block_size": 32, "accuracy_level": 0,
                "why": "no int8 dot-product kernels in MLAS for this CPU: fp32 products, ORT's default block"}
    measured = "" if dot in ("avx512_vnni", "amx_int8") else " (measured on an AVX512-VNNI CPU)"
    if bits == 8:
        return {"cpu": f"{machine} {dot}", "block_size": INT8_BLOCK, "accuracy_level": 4,
                "why": f"int8 products on {dot}; block {INT8_BLOCK}, q8_0's: int8 activations per block of 128 "
                       f"lose 2.3x q8_0's KL divergence{measured}"}
    return {"cpu": f"{machine} {dot}", "block_size": INT4_BLOCK, "accuracy_level": 4,
            "why": f"int8 products on {dot}; block {INT4_BLOCK}: 1.4x faster decode kernels than block 32{measured}"}
