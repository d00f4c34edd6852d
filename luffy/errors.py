"""One exception family for everything luffy refuses to do.

Each class carries the CLI exit code for its kind, so a CI step can tell a bad source from a corrupt
artifact without parsing text. Messages are one line and name the thing at fault (path, node, op, limit).
"""

from __future__ import annotations


class LuffyError(Exception):
    """Base of every error luffy raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(LuffyError, ValueError):
    """An option or argument that cannot be honoured (unknown target, bad precision, malformed ids)."""

    exit_code = 2


class SourceError(LuffyError):
    """The MODEL argument does not name something luffy can read: missing path, hub id, bad factory."""

    exit_code = 3


class UnsupportedModelError(LuffyError):
    """The source was read but its architecture, op or graph shape is outside what luffy supports."""

    exit_code = 4


class CaptureError(LuffyError):
    """torch.export / torch.onnx failed, or the compiled graph disagrees with PyTorch."""

    exit_code = 5


class ArtifactError(LuffyError):
    """An artifact directory is missing files, was tampered with, or was written by an incompatible luffy."""

    exit_code = 6


class CapacityError(LuffyError, ValueError):
    """A request exceeds a limit fixed at compile time (maximum sequence length, batch)."""

    exit_code = 7


class BackendUnavailableError(LuffyError):
    """A package or device a backend needs is not installed here (onnxruntime, tensorrt, a GPU)."""

    exit_code = 8


__all__ = [
    "LuffyError",
    "UsageError",
    "SourceError",
    "UnsupportedModelError",
    "CaptureError",
    "ArtifactError",
    "CapacityError",
    "BackendUnavailableError",
]


def first_line(exc: BaseException, limit: int = 300, text: str | None = None) -> str:
    """An upstream exception's message as one line for a luffy error: its first non-empty line (of ``text``
    when given, e.g. the message with a temporary path replaced), at most ``limit`` characters; its type's
    name when it says nothing."""
    lines = [ln.strip() for ln in (str(exc) if text is None else text).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(exc).__name__
