"""Runtimes: one Engine per backend behind one interface. `load` checks an artifact before trusting it.

Nothing here imports torch: a service loads an ORT artifact with onnxruntime, numpy and tokenizers alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from .engine import Engine
from .manifest import read_manifest
from .ort_compat import check_onnxruntime, share_thread_pool

RUNTIMES = ("ort", "trt")
ENGINE_OPTIONS = {"ort": ("threads", "providers", "huge_pages", "spin", "profile"), "trt": ()}


def load(path: str | os.PathLike, runtime: str | None = None, **options) -> Engine:
    """Check an artifact (manifest format, every file's sha256, runtime compatibility) and load it.

    ``runtime`` defaults to the artifact's target; ``"ort"`` runs any artifact's ONNX graph on ONNX
    Runtime, a TensorRT artifact's portable graph included (how its numerics are checked without a GPU).
    ``"trt"`` refuses an engine built for another TensorRT version or GPU before deserializing it.
    Options go to the engine: ORT takes ``threads``, ``providers``, ``huge_pages``, ``spin`` and ``profile``; TensorRT none.

    >>> import luffy
    >>> engine = luffy.load("build/llama-tiny")       # doctest: +SKIP
    >>> engine.generate_text("Hello", max_new_tokens=8)  # doctest: +SKIP
    """
    return open_engine(Path(path), read_manifest(path), runtime, **options)


def open_engine(path: Path, manifest: dict, runtime: str | None = None, **options) -> Engine:
    """``load`` after the manifest was read and every file's hash checked (``read_manifest``): the runtime
    checks and the engine. For callers that checked the files themselves (``luffy verify``) and must not hash
    a multi-GB artifact twice."""
    runtime = runtime or manifest.get("target", "ort")
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; this luffy has {', '.join(RUNTIMES)}")
    unknown = sorted(set(options) - set(ENGINE_OPTIONS[runtime]))
    if unknown:
        takes = ", ".join(ENGINE_OPTIONS[runtime]) or "none"
        raise UsageError(f"load(..., runtime={runtime!r}) has no option {', '.join(unknown)} (it takes: {takes})")
    if runtime == "trt":
        from .trt import TrtEngine, check_engine, gpu_info, installed_tensorrt

        trt, gpu = installed_tensorrt(), gpu_info()
        check_engine(manifest, path, trt.__version__ if trt is not None else None, gpu)  # before deserializing
        return TrtEngine(path, manifest, trt, gpu)  # options were checked above: TensorRT takes none
    check_onnxruntime(manifest, path)
    from .ort import OrtEngine

    return OrtEngine(path, manifest, **options)


__all__ = ["load", "Engine", "RUNTIMES", "share_thread_pool"]
