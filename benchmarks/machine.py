"""What the numbers were measured on: CPU, cores, memory, package versions, and how busy the machine was."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import resource
import time

from ..runtimes.timing import busy_ticks as _busy_ticks
from .bandwidth import usable_cores

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
    import subprocess
    from pathlib import Path

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


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped worker, builder and their children
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuAccount:
    """How much CPU other processes used while the bench ran: machine busy time (/proc/stat) minus the
    CPU time of this process and its reaped children. Call ``stop`` after every worker has exited."""

    def __init__(self):
        self.ticks, self.own, self.wall = _busy_ticks(), _own_cpu_seconds(), time.perf_counter()
        self.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def stop(self) -> dict:
        wall = time.perf_counter() - self.wall
        ticks = _busy_ticks()
        out = {"wall_s": round(wall, 1), "load_average_before": self.load_before, "other_cpu_share": None}
        if ticks is not None and self.ticks is not None and wall > 0:
            busy = (ticks - self.ticks) / os.sysconf("SC_CLK_TCK")
            other = max(0.0, busy - (_own_cpu_seconds() - self.own))
            out["other_cpu_s"] = round(other, 1)
            out["other_cpu_share"] = round(other / (wall * (os.cpu_count() or 1)), 3)  # of the whole machine
        return out
