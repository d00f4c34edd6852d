"""One capture for several compiles of one source in one process: `CaptureCache`.

torch.export is most of a small model's compile (llama-pydoc: 13.7 of 25.7 s on 2 cores), and it gives the same
graph for the same source and opset whatever the precision. `luffy compile --auto` compiles one source once per
candidate precision; a script that builds several precisions can do the same by passing one cache to each
``luffy.compile(..., captures=cache)``. Explicit, not a hidden global: a compile without a cache captures as
it always did.

What is kept: the captured graph as serialized ONNX (each compile gets its own deserialized copy, so a pass that
rewrites its graph in place cannot reach the next compile's), and the torch module and the rest of the capture,
which the compile only reads (parity and --eval run the module, never change it). Only whole-model captures of
at most MAX_CACHED_BYTES of weights are kept: a streamed capture's weights stay in the checkpoint, and holding a
large model's serialized copy would cost the memory the streamed path exists to save.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import onnx
import onnx_ir as ir

from ...passes.driver import initializer_bytes

# a zoo model is built by its code, a file or directory is keyed by its files; an in-memory module or a factory
# may change between two calls with the same name, so each of those is captured again
CACHED_KINDS = ("zoo", "onnx", "hf-dir")
MAX_CACHED_BYTES = 512 << 20  # initializers of a cached capture: llama-pydoc's are 6.6 MB, a 1B model's 4.9 GB


class CaptureCache:
    """Captures by (source, its files' sizes and times, opset): ``get(src, opset, capture)`` returns a fresh copy
    of the capture ``capture()`` made for the same key, or makes it.

    >>> cache = CaptureCache()                                                            # doctest: +SKIP
    >>> for precision in ("int8", "int4"):                                                # doctest: +SKIP
    ...     luffy.compile("llama-pydoc", output=f"build/{precision}", precision=precision, captures=cache)
    >>> cache.hits                                                                        # doctest: +SKIP
    1
    """

    def __init__(self):
        self._held: dict[tuple, tuple] = {}  # key -> (serialized model, its naming state, Captured, TorchModel)
        self.hits = 0

    def get(self, src, opset: int, capture):
        """(Captured, TorchModel or None) for ``src`` at ``opset``: a copy of a kept one, or ``capture()``'s."""
        if src.kind not in CACHED_KINDS:
            return capture()
        key = (src.kind, str(src.path or src.spec), _stamp(src.path), opset)
        if key in self._held:
            self.hits += 1
            proto, names, captured, tm = self._held[key]
            model = ir.serde.deserialize_model(onnx.ModelProto.FromString(proto))
            _restore_names(model, names)
            return dataclasses.replace(captured, model=model, notes=list(captured.notes)), tm
        captured, tm = capture()
        if initializer_bytes(captured.model) <= MAX_CACHED_BYTES:
            proto = ir.serde.serialize_model(captured.model).SerializeToString()
            self._held[key] = (proto, _names(captured.model), dataclasses.replace(captured, notes=list(captured.notes)), tm)
        return captured, tm


# onnx_ir's graphs name new values val_N and new nodes node_<op>_N, skipping every name the graph has ever held
# (removed ones too); a deserialized copy knows only the names still there, so passes would name what they make
# differently and the artifact's bytes would differ from a fresh capture's. The copy gets the original's naming
# state: onnx_ir's private Graph._name_authority (onnx-ir < 1.2, pyproject's bound), read and written only here.
def _names(model: ir.Model):
    return copy.deepcopy(getattr(model.graph, "_name_authority", None))


def _restore_names(model: ir.Model, names) -> None:
    if names is not None and hasattr(model.graph, "_name_authority"):
        model.graph._name_authority = copy.deepcopy(names)


def _stamp(path) -> str:
    """The source's files as (name, size, mtime): a source changed on disk is a different key."""
    if path is None or not Path(path).exists():
        return ""
    root = Path(path)
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file())
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()
