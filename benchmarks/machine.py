"""What the numbers were measured on: CPU, cores, memory, package versions (how busy the machine was during a
run: luffy.measure.CpuAccount)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

from ..runtimes.cpu_features import usable_cores

VERSIONED = ("luffy", "numpy", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-genai", "torch", "transformers")
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd")


def _cpuinfo() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {"model": model, "flags": []}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"model": model, "flags": [f for f in _FLAGS if f in flags]}


def _memory_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def luffy_source_state() -> str | None:
    """``<commit>`` or ``<commit>+dirty`` when luffy runs from a git checkout (the numbers depend on the tree)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def describe_machine() -> dict:
    """CPU model and flags (from /proc/cpuinfo), cores, memory, OS and the versions of every package involved."""
    cpu = _cpuinfo()
    return {
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "versions": versions(),
        "luffy_source": luffy_source_state(),
    }
