"""luffy: an ahead-of-time compiler for LLM inference.

    import luffy
    luffy.compile("llama-tiny", output="build/llama-tiny")      # capture, optimize, emit
    engine = luffy.load("build/llama-tiny")                      # ONNX Runtime, no torch needed
    engine.generate([[1, 2, 3]], max_new_tokens=16)

Importing luffy loads neither torch nor onnxruntime; each is imported where it is first needed.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .compiler.compile import Artifact, compile  # noqa: E402
from .compiler.config import LuffyConfig  # noqa: E402
from .errors import (  # noqa: E402
    ArtifactError,
    BackendUnavailableError,
    CapacityError,
    CaptureError,
    LuffyError,
    SourceError,
    UnsupportedModelError,
    UsageError,
)
from .optimizer import LuffyOptimizer  # noqa: E402
from .runtimes import load  # noqa: E402

__all__ = [
    "compile", "load", "Artifact", "LuffyConfig", "LuffyOptimizer", "LuffyError", "UsageError", "SourceError",
    "UnsupportedModelError", "CaptureError", "ArtifactError", "CapacityError", "BackendUnavailableError",
    "__version__",
]
