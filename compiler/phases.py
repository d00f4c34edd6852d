"""Wall time and peak resident memory per compile phase, for the compile report.

Linux keeps a process's peak RSS (VmHWM in /proc/self/status) and lets the process reset it (writing 5 to
/proc/self/clear_refs), so each phase's peak is measured exactly, not sampled. Elsewhere, or where the reset is
refused, a phase records the process's lifetime peak so far and says so.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """The process's peak RSS since start (or since the last reset) in bytes."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak() -> bool:
    """Start a new peak-RSS window; False where the OS does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class Phases:
    """``with phases("capture"): ...`` records the phase's seconds and peak RSS; ``report()`` lists them."""

    def __init__(self):
        self.records: dict[str, dict] = {}
        self.process_peak = 0

    @contextlib.contextmanager
    def __call__(self, name: str):
        exact = reset_peak()
        started = time.perf_counter()
        try:
            yield
        finally:
            peak = peak_rss()
            self.process_peak = max(self.process_peak, peak)
            record = self.records.setdefault(name, {"seconds": 0.0, "peak_rss_bytes": 0})
            record["seconds"] = round(record["seconds"] + time.perf_counter() - started, 3)
            record["peak_rss_bytes"] = max(record["peak_rss_bytes"], peak)
            if not exact:
                record["peak_is"] = "process lifetime peak (this OS cannot reset it per phase)"

    def report(self) -> dict:
        return {"phases": self.records, "peak_rss_bytes": max([self.process_peak, peak_rss()])}
