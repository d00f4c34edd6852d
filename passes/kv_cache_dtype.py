"""The KV cache's precision: GroupQueryAttention's cache in fp16, or in int8 / int4 with per-channel scales.

At long context the KV cache, not the weights, is what decode reads and what bounds the sequences a
machine holds (Llama-3.1-8B's fp32 KV is 262 KB per token). ONNX Runtime's GroupQueryAttention (CPU
kernels from onnxruntime 1.30) stores its cache in a type of its own (T_CACHE) beside the compute type:
float16, or int8 / 4-bit packed into uint8 with ``k_scale`` / ``v_scale`` inputs, quantizing each new
position as it writes it and dequantizing as it reads. Its scales are static, so this pass takes them
from calibration (the compiler's ``collect_kv_ranges``, or on a streamed compile ``layer_kv_ranges``, region by
region: the largest magnitude of every key and value channel on --calib text) and stores them as initializers:

- PER_CHANNEL, scale [1, kv_heads, 1, head_dim] for keys and values alike. Keys have outlier channels
  (KIVI, KVQuant): one scale per channel keeps a large channel from flattening the rest. A key channel's
  scale also covers its rotary partner (channel i and i + head_dim/2 rotate into each other as the
  position grows, so one seen only at short positions still fits at long ones).
- Symmetric: scale = max|x| / 127 (int8) or / 7 (int4); values beyond the calibrated range saturate.

The graph's past inputs and present outputs change type (and int4 halves their last dimension), so the
runtime allocates the cache from the graph's own I/O types. bf16 has no GroupQueryAttention kernel on
the CPU and is refused before capture (compiler/config.py). It runs after the precision stage: the cache
type pairs with the compute type that stage left (fp32, or fp16 for --precision fp16).
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from ..errors import UnsupportedModelError

KV_DTYPES = ("fp32", "fp16", "int8", "int4")
_STORAGE = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16, "int8": ir.DataType.INT8,
            "int4": ir.DataType.UINT8}
_LEVELS = {"int8": 127, "int4": 7}
K_SCALE, V_SCALE = 12, 13  # GroupQueryAttention's k_scale / v_scale input slots
_PAST = re.compile(r"^past_key_values\.(\d+)\.key$")


class KvCacheDtype(ir.passes.InPlacePass):
    """``ranges``: layer -> (key max |x|, value max |x|), each [kv_heads, head_dim] (int8/int4 only)."""

    def __init__(self, dtype: str, ranges: dict[int, tuple[np.ndarray, np.ndarray]] | None = None):
        super().__init__()
        if dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype {dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        self.dtype, self.ranges = dtype, ranges or {}
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
        if not nodes:  # the user asked for this cache: an artifact without it would be a silent downgrade
            raise UnsupportedModelError(f"--kv-cache-dtype {self.dtype} needs the graph's attention fused into "
                                        "GroupQueryAttention over a shared KV buffer; fuse-gqa did not match "
                                        "(its reason is in the report of a compile without the option)")
        for node in nodes:
            self._rewrite(model.graph, _layer(node), node)
        self.stats = {"matches": len(nodes), "kv_cache_dtype": self.dtype}
        if self.dtype in _LEVELS:
            self.stats["scales"] = "per-channel, calibrated"
        return ir.passes.PassResult(model, modified=True)

    def _rewrite(self, graph: ir.Graph, layer: int, node: ir.Node) -> None:
        storage = _STORAGE[self.dtype]
        for value in (node.inputs[3], node.inputs[4], node.outputs[1], node.outputs[2]):
            # a new type, not ``value.dtype = storage``: that sets the dtype on a TensorType a clone of the graph
            # shares (ir's clone keeps types), and a streamed GPTQ's fp32 copy (stream/calibration.py) would
            # take int8 past inputs
            value.type = ir.TensorType(storage)
            if self.dtype == "int4":  # two 4-bit values per byte along head_dim
                dims = list(value.shape)
                value.shape = ir.Shape([*dims[:3], dims[3] // 2])
        if self.dtype not in _LEVELS:
            return
        if layer not in self.ranges:
            raise ValueError(f"{node.name}: no calibrated key/value range for layer {layer}")
        key_range, value_range = self.ranges[layer]
        key_range = np.maximum(key_range, np.roll(key_range, key_range.shape[-1] // 2, axis=-1))  # rotary partners
        inputs = list(node.inputs) + [None] * max(0, V_SCALE + 1 - len(node.inputs))
        for slot, kind, found in ((K_SCALE, "key", key_range), (V_SCALE, "value", value_range)):
            inputs[slot] = _scale(graph, f"luffy_kv_{kind}_scale_{layer}", found, _LEVELS[self.dtype])
        _replace_inputs(node, inputs)
        for name in ("k_quant_type", "v_quant_type"):
            node.attributes[name] = ir.AttrString(name, "PER_CHANNEL")
        node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 4 if self.dtype == "int4" else 8)


def kv_cache_dtype(dtype: str, ranges=None) -> KvCacheDtype:
    return KvCacheDtype(dtype, ranges)


def _layer(node: ir.Node) -> int:
    """The layer whose cache ``node`` holds, from its past input's name (past_key_values.N.key)."""
    match = _PAST.match(node.inputs[3].name or "")
    if match is None:
        raise ValueError(f"{node.name}: past key input {node.inputs[3].name!r} is not past_key_values.N.key")
    return int(match.group(1))


def _scale(graph: ir.Graph, name: str, found: np.ndarray, levels: int) -> ir.Value:
    # a channel that never moved (all zeros) still needs a positive scale
    scale = (np.maximum(found, 1e-6) / levels).astype(np.float32)[None, :, None, :]  # [1, kv_heads, 1, head_dim]
    value = ir.Value(name=name, const_value=ir.tensor(scale))
    value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
    graph.register_initializer(value)
    return value


def _replace_inputs(node: ir.Node, inputs: list) -> None:
    """``node`` reading ``inputs`` (at least as many as it has)."""
    if len(inputs) > len(node.inputs):
        node.resize_inputs(len(inputs))
    for i, value in enumerate(inputs):
        if node.inputs[i] is not value:
            node.replace_input_with(i, value)
