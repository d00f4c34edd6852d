"""Wall time and peak resident memory per compile phase, for the compile report.

Each phase's peak is sampled (VmRSS from /proc/self/statm every SAMPLE_SECONDS by a background thread); the
process's overall peak is the kernel's own high-water mark (VmHWM), exact. The kernel's mark is never reset
here (Linux allows it, /proc/self/clear_refs), so `/usr/bin/time -v` and other outside measures of the same
process stay right. Where /proc is missing the phases record wall time only.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import threading
import time
from pathlib import Path

STATUS, STATM = Path("/proc/self/status"), Path("/proc/self/statm")
SAMPLE_SECONDS = 0.005
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int | None:
    """Resident bytes now, or None without /proc."""
    try:
        return int(STATM.read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def peak_rss() -> int:
    """The process's peak resident bytes since it started."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True, name="luffy-rss-sampler")
        self.peak = current_rss() or 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, current_rss() or 0)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, current_rss() or 0)


class Phases:
    """``with phases("capture"): ...`` records the phase's seconds and sampled peak RSS; ``report()`` lists them
    with the process's exact peak."""

    def __init__(self):
        self.records: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        sampler = _Sampler() if current_rss() is not None else None
        if sampler is not None:
            sampler.start()
        started = time.perf_counter()
        try:
            yield
        finally:
            record = self.records.setdefault(name, {"seconds": 0.0})
            record["seconds"] = round(record["seconds"] + time.perf_counter() - started, 3)
            if sampler is not None:
                record["peak_rss_bytes"] = max(record.get("peak_rss_bytes", 0), sampler.stop())

    def report(self) -> dict:
        # the kernel syncs its per-CPU RSS counters into VmHWM lazily: a sample may read a little above it
        sampled = max((r.get("peak_rss_bytes", 0) for r in self.records.values()), default=0)
        return {"phases": self.records, "peak_rss_bytes": max(peak_rss(), sampled),
                "method": f"per phase: resident set sampled every {SAMPLE_SECONDS * 1000:g} ms; overall: the "
                          "kernel's high-water mark (VmHWM)"}
