"""Can the installed onnxruntime run a graph's opsets and IR version? Asked of onnxruntime itself.

A table of "first ORT release per opset" goes stale with every release (it refused opsets 24-26 that ORT
1.32 runs). Instead a one-node probe model carrying the graph's opset imports and IR version is loaded
into a session; ORT's own refusal (ValidateOpsetForDomain, the IR version check) is the answer. Probes are
cached per process: a serving process loading many artifacts builds each distinct probe once.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from ..errors import ArtifactError, BackendUnavailableError, UsageError


_SHARED_POOL = {"on": False, "threads": None}


def share_thread_pool(threads: int | None = None) -> None:
    """Make the one intra-op thread pool that every ONNX Runtime session luffy creates afterwards in this process
    shares (``threads`` threads; all cores by default). ``luffy run --draft``, ``luffy serve --draft`` and the
    bench workers call it themselves. Engines do not need it to take turns on the cores (their threads sleep
    when a run ends, see ``engine_session_options``): it is one pool's memory and thread count.

    Why one pool: each session otherwise owns a pool whose threads spin for a while after every step. Two
    engines that take turns (a target and its speculative draft) then leave each other's cores busy:
    measured on the 2-core reference machine, a 156M fp32 target with its int8 draft (K=4) took 18.5 ms per
    token with two pools and 10.2 with one.

    Why not by default in ``luffy.load``: ONNX Runtime's pools are then global to the process, and it refuses
    every later session that keeps the default ``use_per_session_threads=True`` ("use_per_session_threads
    must be false when using a global thread pool"): any other ONNX Runtime user in the caller's process (its
    own models, onnxruntime.quantization) would break behind its back. The pool's size is fixed once made.

    >>> luffy.runtimes.share_thread_pool(2); target = luffy.load(a); draft = luffy.load(b)   # doctest: +SKIP
    """
    ort = import_onnxruntime()
    if _SHARED_POOL["on"]:
        if threads not in (None, _SHARED_POOL["threads"]):
            made = _SHARED_POOL["threads"] or "all cores'"
            raise UsageError(f"threads={threads}: the engines of this process share one ONNX Runtime thread pool of "
                             f"{made} threads, made by share_thread_pool; load every engine with the same "
                             "threads, or none")
        return
    ort.set_global_thread_pool_sizes(threads or 0, 1)
    _SHARED_POOL.update(on=True, threads=threads)


def thread_pool_shared() -> bool:
    return _SHARED_POOL["on"]


def session_options(threads: int | None = None):
    """SessionOptions for a luffy session: the shared pool once it exists, else a pool of its own of ``threads``."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if _SHARED_POOL["on"]:
        options.use_per_session_threads = False  # ONNX Runtime refuses anything else once pools are global
    elif threads:
        options.intra_op_num_threads = threads
    return options


def engine_session_options(threads: int | None, spin: bool):
    """(SessionOptions, a record of its thread pool) for an engine's session.

    On the process's shared pool once ``share_thread_pool`` made it (``threads`` must then match its size);
    otherwise a pool of the engine's own. Either way its threads spin only while one of the engine's runs is
    going on and sleep when it ends (ONNX Runtime's ``session.force_spinning_stop``), so engines that take turns
    (a target and its speculative draft, several artifacts in one server) never leave each other's cores busy,
    with no call from the caller: alternating two private 2-thread pools measured 57-66 ms per round with
    spinning after each run, 44-50 with it stopped, the larger session alone unchanged (20-22 ms). ``spin=False``:
    a private pool's threads never spin (a server that leaves the cores to its HTTP threads).
    """
    if _SHARED_POOL["on"]:
        share_thread_pool(threads)  # refuses another size in one line
        options = session_options()
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return options, {"shared": True, "threads": _SHARED_POOL["threads"] or "all cores", "spinning": "within a run"}
    options = session_options(threads)
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options, {"shared": False, "threads": threads or "all cores", "spinning": "within a run" if spin else "never"}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from None
    return onnxruntime


@functools.lru_cache(maxsize=64)
def _probe(opsets: tuple[tuple[str, int], ...], ir_version: int | None) -> str | None:
    """None when ORT loads a graph with these opset imports and IR version, else ORT's reason in one line."""
    from onnx import TensorProto, helper

    ort = import_onnxruntime()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "luffy_ort_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    imports = [helper.make_opsetid("" if domain == "ai.onnx" else domain, version) for domain, version in opsets]
    if not any(domain == "ai.onnx" for domain, _ in opsets):
        imports.append(helper.make_opsetid("", 13))  # Identity needs some ai.onnx opset
    model = helper.make_model(graph, opset_imports=imports)
    if ir_version is not None:
        model.ir_version = ir_version
    options = session_options()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT's Fail/InvalidGraph: the refusal is the answer
        return _reason(str(exc))
    return None


def _reason(message: str) -> str:
    domain = re.search(r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", message, re.S)
    if domain:
        return f"it uses {domain.group(2)} opset {domain.group(1)}; this onnxruntime supports up to {domain.group(3)}"
    ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", message)
    if ir:
        return f"it has ONNX IR version {ir.group(1)}; this onnxruntime reads up to {ir.group(2)}"
    lines = [ln for ln in re.sub(r"/onnxruntime_src/\S+", "", message).splitlines() if ln.strip()]
    return lines[0].strip() if lines else "onnxruntime refused a probe graph with the same opsets"


def ort_refusal(opset_imports: dict[str, int], ir_version: int | None = None) -> str | None:
    """Why the installed onnxruntime cannot run a graph with these opset imports (None: it can).

    >>> ort_refusal({"ai.onnx": 40})            # doctest: +SKIP
    'it uses ai.onnx opset 40; this onnxruntime supports up to 28'
    """
    return _probe(tuple(sorted((str(d), int(v)) for d, v in opset_imports.items())), ir_version)


def check_onnxruntime(manifest: dict, path: Path) -> None:
    """Refuse an artifact the installed onnxruntime cannot run, naming the versions, before loading it."""
    ort = import_onnxruntime()
    reason = ort_refusal(manifest.get("opset_imports") or {}, manifest.get("ir_version"))
    if reason is not None:
        raise ArtifactError(f"{path}: onnxruntime {ort.__version__} cannot run this artifact: {reason}")
