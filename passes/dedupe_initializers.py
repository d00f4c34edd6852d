"""dedupe-initializers: identical initializers stored once, without holding every weight's bytes at once.

onnx_ir's DeduplicateInitializersPass keys a dict on each tensor's full bytes: every weight of the model is held
a second time until the pass ends, and a weight still in its checkpoint (a lazy tensor) is read for it. Here the
key is (dtype, shape, fingerprint): a tensor that can say what its values are without reading them (luffy's
checkpoint tensors hash a few rows of their file; a derived tensor hashes its recipe and inputs) gives its own
``fingerprint()``, any other tensor a hash of its bytes. Tensors whose keys match are compared in full before one
replaces the other, so what is merged is exactly what onnx_ir's pass merges.
"""

from __future__ import annotations

import hashlib

import onnx_ir as ir

SIZE_LIMIT = 1 << 30  # elements; tied embeddings of today's vocabularies are far below


def fingerprint(tensor: ir.TensorProtocol) -> str:
    """A digest of a tensor's values: its own ``fingerprint()`` when it has one, else a hash of its bytes."""
    own = getattr(tensor, "fingerprint", None)
    if callable(own):
        return own()
    if tensor.dtype == ir.DataType.STRING:
        data = b"\0".join(tensor.string_data())
    else:
        data = tensor.tobytes()
    return f"bytes:{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def _same_values(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    if a is b:
        return True
    if a.dtype == ir.DataType.STRING:
        return list(a.string_data()) == list(b.string_data())
    return a.tobytes() == b.tobytes()


class DedupeInitializers(ir.passes.InPlacePass):
    def __init__(self, size_limit: int = SIZE_LIMIT):
        super().__init__()
        self.size_limit = size_limit
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        merged = 0
        for graph in model.graphs():
            kept: dict[tuple, list[ir.Value]] = {}
            for value in tuple(graph.initializers.values()):
                tensor = value.const_value
                if tensor is None or value.is_graph_input() or value.is_graph_output() or tensor.size > self.size_limit:
                    continue
                key = (tensor.dtype, tuple(tensor.shape), fingerprint(tensor))
                same = next((k for k in kept.get(key, []) if _same_values(k.const_value, tensor)), None)
                if same is None:
                    kept.setdefault(key, []).append(value)
                    continue
                value.replace_all_uses_with(same)
                graph.initializers.pop(value.name)
                merged += 1
        self.stats = {"matches": merged}
        if not merged:  # the report's fusion coverage names why a pass never fired
            self.stats["not_matched"] = [{"rule": "DedupeInitializers", "reason": "no two initializers hold the same "
                                                                                  "values"}]
        return ir.passes.PassResult(model, modified=merged > 0)


def dedupe_initializers() -> DedupeInitializers:
    return DedupeInitializers()
