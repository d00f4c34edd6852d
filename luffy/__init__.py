"""luffy: an ahead-of-time compiler for LLM inference.

    import luffy
    luffy.compile("llama-tiny", output="build/llama-tiny")      # capture, optimize, emit
    engine = luffy.load("build/llama-tiny")                      # ONNX Runtime, no torch needed
    engine.generate([[1, 2, 3]], max_new_tokens=16)

The package root is lazy: ``import luffy`` loads only the error classes. ``luffy.compile`` (torch,
transformers, onnxscript) and ``luffy.load`` (onnxruntime) import their halves on first use, so a serving
machine that installed luffy without extras loads and serves artifacts.
"""

from __future__ import annotations

import importlib

from .errors import (
    ArtifactError,
    BackendUnavailableError,
    CapacityError,
    CaptureError,
    LuffyError,
    SourceError,
    UnsupportedModelError,
    UsageError,
)

__version__ = "0.1.0"

# public name -> (module, attribute), imported on first access (PEP 562)
_LAZY = {
    "compile": ("luffy.auto", "compile"),  # the compiler, or with auto=True the decider above it
    "Artifact": ("luffy.compiler.compile", "Artifact"),
    "CaptureCache": ("luffy.compiler.capture.reuse", "CaptureCache"),  # one capture for several compiles
    "LuffyConfig": ("luffy.compiler.config", "LuffyConfig"),
    "LuffyOptimizer": ("luffy.optimizer", "LuffyOptimizer"),
    "load": ("luffy.runtimes", "load"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name]
        if module == "luffy.runtimes":
            value = getattr(importlib.import_module(module), attribute)
        else:
            from .extras import import_compiler

            value = getattr(import_compiler(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'luffy' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "compile", "load", "Artifact", "CaptureCache", "LuffyConfig", "LuffyOptimizer", "LuffyError", "UsageError", "SourceError",
    "UnsupportedModelError", "CaptureError", "ArtifactError", "CapacityError", "BackendUnavailableError",
    "__version__",
]
