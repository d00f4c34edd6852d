"""Resolve the MODEL argument (one parameter for the CLI and the API) into a loadable source.

Accepted forms, tried in this order:
  - an in-memory ``torch.nn.Module`` (the Python API only),
  - a zoo name (``llama-tiny``),
  - a path to an ``.onnx`` file,
  - a path to a local Hugging Face model directory (``config.json`` + safetensors),
  - ``package.module:factory``, a callable returning a module and its example inputs.
Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import SourceError
from ...models_zoo import ZOO

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"
MODULE = "module"


@dataclass
class Source:
    """Where a model comes from. ``kind`` is zoo | onnx | hf-dir | factory | module."""

    kind: str
    spec: str
    path: Path | None = None
    obj: Any = None  # the in-memory module, for kind == "module"

    def describe(self) -> dict:
        out = {"kind": self.kind, "spec": self.spec}
        if self.path is not None:
            out["path"] = str(self.path)
        return out


def resolve_source(source: Any) -> Source:
    """Classify ``source`` without loading it; raise SourceError with the reason when it is unusable."""
    if not isinstance(source, (str, Path)):
        if is_torch_module(source):
            return Source("module", f"<in-memory {type(source).__name__}>", obj=source)
        raise SourceError(f"cannot compile an object of type {type(source).__name__}: pass a path, zoo name or nn.Module")
    spec = str(source)
    if spec in ZOO:
        return Source("zoo", spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".onnx":
            return Source("onnx", spec, path.resolve())
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise SourceError(f"{path}: directory has no config.json; expected a Hugging Face model directory")
            return Source("hf-dir", spec, path.resolve())
        raise SourceError(f"{path}: not an .onnx file or a model directory")
    if _FACTORY_RE.match(spec):
        return Source("factory", spec)
    if _HUB_ID_RE.match(spec) and not spec.startswith((".", "/")):
        raise SourceError(
            f"{spec}: looks like a model hub id; luffy never downloads models, pass a local directory "
            "with config.json and *.safetensors (e.g. one saved by save_pretrained)"
        )
    zoo = ", ".join(ZOO)
    raise SourceError(f"{spec}: no such file or directory, and not a zoo model ({zoo}) or package.module:factory")


def is_torch_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(obj, torch.nn.Module)
