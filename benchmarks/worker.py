"""One process per system, driven over a pipe, so each system's peak RSS is its own.

The parent starts ``python -m luffy.benchmarks.worker`` and sends one JSON request per line:

    {"op": "call", "func": "luffy.benchmarks.models:zoo_hf_dir", "kwargs": {...}}   one-shot work
    {"op": "build", "system": "ort-export", "paths": {...}}                          compile / export / builder
    {"op": "load", "system": "torch", "paths": {...}}                                open the model
    {"op": "run", "ids": [[...]], "new_tokens": N}                                   one timed generation
    {"op": "rss"}                                                                    peak RSS of this process
    {"op": "exit"}

and reads one JSON reply per line: ``{"ok": true, ...}`` or ``{"ok": false, "error": TYPE, "message": ...}``.
Timing happens inside the worker (no pipe traffic inside a timed region). Replies use a private copy of
the original stdout; fd 1 is pointed at stderr, so whatever libraries print lands in the worker's log.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ..errors import LuffyError, first_line
from ..measure import time_generation
from . import peers

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Popen's process_group arrived in Python 3.11; setpgrp in the child is what it does
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space.

    Linux: VmHWM from /proc/self/status. Not ru_maxrss: a child started by fork/vfork + exec inherits the
    parent's resident size at the fork in its ru_maxrss (the kernel folds the old address space's high-water
    mark in at exec), so every worker would report at least the parent's RSS. Elsewhere: ru_maxrss.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class _Session:
    def __init__(self):
        self.runner = None

    def call(self, func: str, kwargs: dict) -> dict:
        module, _, name = func.partition(":")
        if not module.startswith("luffy.benchmarks."):
            raise ValueError(f"worker only calls luffy.benchmarks functions, not {func}")
        return {"result": getattr(importlib.import_module(module), name)(**kwargs)}

    def build(self, system: str, paths: dict) -> dict:
        return {"result": peers.RUNNERS[system](paths).build()}

    def load(self, system: str, paths: dict) -> dict:
        baseline = _peak_rss_bytes()
        self.runner = peers.RUNNERS[system](paths)
        start = time.perf_counter()
        info = self.runner.load()
        return {"result": {**info, "load_s": round(time.perf_counter() - start, 3), "baseline_rss_bytes": baseline}}

    def run(self, ids: list, new_tokens: int) -> dict:
        array = np.asarray(ids, dtype=np.int64)
        if hasattr(self.runner, "timed_run"):  # a system that times itself (llama-bench, a peer's own Python)
            result = self.runner.timed_run(array, new_tokens)
            if result["tokens"] is not None and len(result["tokens"]) != new_tokens:
                raise RuntimeError(f"{self.runner.name}: produced {len(result['tokens'])} tokens, not {new_tokens}")
            return {"result": result}
        result = time_generation(lambda first_token: self.runner.generate(array, new_tokens, first_token), new_tokens,
                                 self.runner.name)
        if getattr(self.runner, "last_stats", None):  # speculative decoding: acceptance of this run
            result["speculation"] = self.runner.last_stats
        return {"result": result}

    def rss(self) -> dict:
        own = getattr(self.runner, "peak_rss_bytes", None)  # a system in a process of its own reports that one's
        return {"result": {"peak_rss_bytes": own() if own else _peak_rss_bytes()}}


def serve() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    session = _Session()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "exit":
            break
        try:
            reply = {"ok": True, **getattr(session, op)(**request)}
        except Exception as exc:  # report it; the parent decides what is fatal
            traceback.print_exc()
            message = first_line(exc)
            reply = {"ok": False, "error": type(exc).__name__, "message": message,
                     "exit_code": exc.exit_code if isinstance(exc, LuffyError) else None}
        replies.write(json.dumps(reply) + "\n")
        sys.stderr.flush()


class WorkerFailed(Exception):
    """A request failed inside the worker (``error`` is the exception type there) or the worker died."""

    def __init__(self, error: str, message: str, exit_code: int | None = None, log: Path | None = None):
        super().__init__(f"{error}: {message}")
        self.error, self.message, self.exit_code, self.log = error, message, exit_code, log


class Worker:
    """The parent's handle on one worker process; its stderr goes to ``log``."""

    def __init__(self, log: Path):
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "a")
        env = {**os.environ, **_OFFLINE}
        # its own process group (same session): pause() stops it and whatever it started (a peer's own Python,
        # llama-bench), and if this process dies the kernel wakes the orphaned group with SIGHUP, which ends it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "luffy.benchmarks.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log_file, text=True, env=env, bufsize=1, **_OWN_GROUP,
        )
        self.paused = False

    def pause(self) -> None:
        """Stop the worker's process group (SIGSTOP) while other systems run: an idle runtime's threads (OpenVINO's,
        ORT's spinning pool) then take no CPU and no memory bandwidth from the one being timed."""
        if not self.paused and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.paused = True
            _wait_until_stopped(self.proc.pid)

    def resume(self) -> None:
        if self.paused and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def request(self, op: str, **fields) -> dict:
        self.resume()
        try:
            self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            code = self.proc.wait()
            raise WorkerFailed("WorkerDied", f"worker exited with status {code} during {op!r}{self._log_tail()}", log=self.log)
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise WorkerFailed(reply["error"], reply["message"], reply.get("exit_code"), self.log)
        return reply["result"]

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return f" (last log line: {lines[-1].strip()})" if lines else ""

    def close(self) -> None:
        self.resume()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def one_shot(op: str, log: Path, **fields) -> dict:
    """Run one request in a fresh worker that exits afterwards (builds: their memory never counts)."""
    with Worker(log) as worker:
        return worker.request(op, **fields)


def _wait_until_stopped(pid: int, timeout: float = 2.0) -> None:
    """SIGSTOP is delivered asynchronously: on a loaded machine a running worker keeps its CPU for a while after
    killpg returns, and would still be running when the next system's timing starts. Wait (bounded) until /proc
    says it is stopped; where /proc is missing, or the process is gone, there is nothing to wait for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X"):
                    return
        except OSError:
            return
        time.sleep(0.001)


if __name__ == "__main__":
    serve()
