"""The KV cache's precision for TensorRT: the step graph's past inputs and present outputs in the cache's type.

TensorRT's graph (the portable one, tensorrt.md) keeps the captured interface: past [B, H, past, d] in,
present = Concat(past, new) out, and its runtime holds the cache as whatever type the engine's I/O has. So
the choice is carried at the interface, in standard ONNX that TensorRT's parser reads (and ONNX Runtime runs,
which is how it is checked here):
  - fp16 / bf16: past arrives in that type and is Cast to the compute type before the Concat; present is
    Cast back;
  - int8: DequantizeLinear(past) before the Concat and QuantizeLinear(present), one scale per layer and kind
    (TensorRT quantizes activations per tensor), symmetric: largest |x| on the calibration text / 127.
    Re-quantizing the past half of present with its own scale gives back the same codes, so nothing drifts
    step to step.
int4 has no TensorRT activation type and is refused before capture (compiler/config.py).
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from ..errors import UnsupportedModelError

_CAST = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class KvCacheIO(ir.passes.InPlacePass):
    """``ranges``: layer -> (key max |x|, value max |x|) per channel (int8 only; reduced to one scale each)."""

    def __init__(self, dtype: str, ranges: dict | None = None):
        super().__init__()
        self.dtype, self.ranges = dtype, ranges or {}
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        outputs = {v.name: v for v in graph.outputs}
        pasts = [v for v in graph.inputs if _PAST.match(v.name or "")]
        if not pasts:
            raise UnsupportedModelError(f"--kv-cache-dtype {self.dtype}: the graph has no past_key_values inputs")
        for past in pasts:
            layer, kind = _PAST.match(past.name).groups()
            present = outputs.get(f"present.{layer}.{kind}")
            if present is None:
                raise UnsupportedModelError(f"--kv-cache-dtype {self.dtype}: {past.name} has no present.{layer}.{kind}")
            scale = self._scale(graph, int(layer), kind) if self.dtype == "int8" else None
            self._decode_past(graph, past, scale)
            self._encode_present(graph, present, scale)
        self.stats = {"matches": len(pasts), "kv_cache_dtype": self.dtype}
        if self.dtype == "int8":
            self.stats["scales"] = "per tensor (layer and kind), calibrated"
        return ir.passes.PassResult(model, modified=True)

    def _scale(self, graph: ir.Graph, layer: int, kind: str) -> ir.Value:
        if layer not in self.ranges:
            raise ValueError(f"no calibrated key/value range for layer {layer}")
        found = float(np.max(self.ranges[layer][0 if kind == "key" else 1]))
        value = ir.Value(name=f"luffy_kv_{kind}_scale_{layer}",
                         const_value=ir.tensor(np.array(max(found, 1e-6) / 127, dtype=np.float32)))
        value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
        graph.register_initializer(value)
        return value

    def _decode_past(self, graph: ir.Graph, past: ir.Value, scale: ir.Value | None) -> None:
        compute = past.dtype
        uses = list(past.uses())
        if scale is None:
            node = ir.node("Cast", [past], attributes={"to": compute})
        else:
            node = ir.node("DequantizeLinear", [past, scale, _zero(graph)])
        node.outputs[0].dtype, node.outputs[0].shape = compute, past.shape
        graph.insert_before(uses[0].node if uses else next(iter(graph)), [node])
        for use in uses:
            use.node.replace_input_with(use.idx, node.outputs[0])
        past.dtype = _CAST.get(self.dtype, ir.DataType.INT8)

    def _encode_present(self, graph: ir.Graph, present: ir.Value, scale: ir.Value | None) -> None:
        storage = _CAST.get(self.dtype, ir.DataType.INT8)
        if scale is None:
            node = ir.node("Cast", [present], attributes={"to": storage})
        else:
            node = ir.node("QuantizeLinear", [present, scale, _zero(graph)])
        graph.insert_after(present.producer(), [node])
        encoded = node.outputs[0]
        encoded.dtype, encoded.shape = storage, present.shape
        name = present.name
        present.name = f"{name}.decoded"
        encoded.name = name
        graph.outputs[graph.outputs.index(present)] = encoded


def kv_cache_io(dtype: str, ranges=None) -> KvCacheIO:
    return KvCacheIO(dtype, ranges)


def _zero(graph: ir.Graph) -> ir.Value:
    """The int8 zero point (symmetric), one initializer shared by every Q/DQ node."""
    name = "luffy_kv_zero_point"
    if name not in graph.initializers:
        value = ir.Value(name=name, const_value=ir.tensor(np.array(0, dtype=np.int8)))
        value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
        graph.register_initializer(value)
    return graph.initializers[name]
