"""Runtimes: one Engine per backend behind one interface. `load` checks an artifact before trusting it.

Nothing here imports torch: a service loads an ORT artifact with onnxruntime, numpy and tokenizers alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..compiler.artifact import read_manifest
from ..errors import ArtifactError, BackendUnavailableError, UsageError
from .engine import Engine

RUNTIMES = ("ort", "trt")

# The first onnxruntime release that implements each ai.onnx opset: an older install cannot run the graph.
ORT_MIN_FOR_OPSET = {17: (1, 14), 18: (1, 15), 19: (1, 16), 20: (1, 17), 21: (1, 20), 22: (1, 20), 23: (1, 22)}


def _version_tuple(text: str) -> tuple[int, int]:
    parts = text.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_onnxruntime(manifest: dict, path: Path) -> None:
    """Refuse an artifact whose opset the installed onnxruntime cannot run, naming both versions."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime") from None
    opset = manifest.get("opset_imports", {}).get("ai.onnx")
    if opset is None:
        return
    installed = _version_tuple(onnxruntime.__version__)
    needed = ORT_MIN_FOR_OPSET.get(opset)
    if needed is None and opset > max(ORT_MIN_FOR_OPSET):
        needed = (999, 0)
    if needed is not None and installed < needed:
        raise ArtifactError(
            f"{path}: graph uses ONNX opset {opset}, which needs onnxruntime >= {needed[0]}.{needed[1]}; "
            f"installed onnxruntime is {onnxruntime.__version__}"
        )


def load(path: str | os.PathLike, runtime: str | None = None, **options) -> Engine:
    """Check an artifact (manifest format, every file's sha256, runtime compatibility) and load it.

    ``runtime`` defaults to the artifact's target; ``"ort"`` runs any artifact's ONNX graph on ONNX
    Runtime, a TensorRT artifact's portable graph included (how its numerics are checked without a GPU).
    ``"trt"`` refuses an engine built for another TensorRT version or GPU before deserializing it.
    Options go to the engine (``threads``, ``providers`` for ORT).

    >>> import luffy
    >>> engine = luffy.load("build/llama-tiny")       # doctest: +SKIP
    >>> engine.generate_text("Hello", max_new_tokens=8)  # doctest: +SKIP
    """
    path = Path(path)
    manifest = read_manifest(path)
    runtime = runtime or manifest.get("target", "ort")
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; this luffy has {', '.join(RUNTIMES)}")
    if runtime == "trt":
        from ..compiler.trt_build import gpu_info, installed_tensorrt
        from .trt import TrtEngine, check_engine

        trt, gpu = installed_tensorrt(), gpu_info()
        check_engine(manifest, path, trt.__version__ if trt is not None else None, gpu)  # before deserializing
        return TrtEngine(path, manifest, trt, gpu, **options)
    check_onnxruntime(manifest, path)
    from .ort import OrtEngine

    return OrtEngine(path, manifest, **options)


__all__ = ["load", "Engine", "RUNTIMES"]
