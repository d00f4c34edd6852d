"""Can one GroupQueryAttention step take several rows of several tokens with a cache? (fuse-gqa asks.)

Without help, ONNX Runtime's GroupQueryAttention runs a multi-token step with past only at batch 1, so
chunked prefill and speculative verification went one sequence at a time. onnxruntime 1.32 added an
optional ``query_seqlens`` input: each row's chunk is right-padded to the step's width, row b's valid
tokens [0, Q_b) go after the P_b it already holds, and query s of row b sits at position P_b + s. The
input needs ``causal=1``: the op then masks key k for query s of row b when k > P_b + s, row by row.

fuse-gqa keeps the model's own mask as ``attention_bias``; the model computes it for the batch as a whole,
taking query s at position total - S + s for every row. For a mask that is causal plus padding only, the
model's rule allows a superset of what the op's per-row causal rule allows (P_b + S <= total), so the two
together are exactly per-row causal plus padding. A mask with any other rule (a sliding window is relative
to the query's position) would be shifted for a row that ends before the batch's total: such graphs keep
one multi-token row per step. The mask's rule is read numerically, by evaluating the subgraph that
computes it (onnx's reference evaluator, a few dozen shape-sized nodes) at a long total length.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
from onnx.reference import ReferenceEvaluator
from onnxruntime.capi import onnxruntime_pybind11_state as state

QUERY_SEQLENS = "query_seqlens"
QUERY_SEQLENS_INDEX = 16  # GroupQueryAttention's input slot for it (com.microsoft opset 1)
PROBE_TOTAL = 1 << 15  # long enough for the sliding windows of today's models to show in the mask
PROBE_WIDTH = 2
MASKED = -1e4  # a bias at or below this masks the key (models use -inf or the dtype's lowest value)
_FEEDABLE = ("input_ids", "attention_mask", "position_ids")


@functools.cache
def ort_takes_query_seqlens() -> str | None:
    """None when the installed onnxruntime's GroupQueryAttention has ``query_seqlens``, else why not."""
    schema = next((s for s in state.get_all_operator_schema()
                   if s.name == "GroupQueryAttention" and s.domain == "com.microsoft"), None)
    if schema is not None and any(i.name == QUERY_SEQLENS for i in schema.inputs):
        return None
    return f"onnxruntime {onnxruntime.__version__}'s GroupQueryAttention has no query_seqlens input (needs >= 1.32)"


def mask_rule_refusal(model: ir.Model, biases: list[ir.Value]) -> str | None:
    """None when every ``bias`` (a GroupQueryAttention's attention_bias) is the causal-plus-padding mask alone,
    else the reason several rows of several tokens cannot share a step."""
    for bias in dict.fromkeys(biases):
        try:
            allowed = _evaluate(model, bias)
        except Exception as exc:  # noqa: BLE001 - an op the reference evaluator lacks, an unexpected input
            return f"cannot evaluate the attention mask {bias.name}: {type(exc).__name__}: {str(exc)[:120]}"
        positions = PROBE_TOTAL - PROBE_WIDTH + np.arange(PROBE_WIDTH)
        causal = np.arange(PROBE_TOTAL)[None, :] <= positions[:, None]
        if allowed.shape != causal.shape or not (allowed == causal).all():
            return (f"the model's attention mask {bias.name} is not causal plus padding alone (a sliding window?): "
                    "multi-token rows with a cache step one at a time")
    return None


def _evaluate(model: ir.Model, bias: ir.Value) -> np.ndarray:
    """The [width, total] keys ``bias`` lets each query see, for one unpadded row at the probe's lengths."""
    nodes, inputs, constants = _producers(model.graph, bias)
    unknown = sorted(set(inputs) - set(_FEEDABLE))
    if unknown:
        raise ValueError(f"the mask reads graph inputs {unknown}")
    feeds = {"input_ids": np.zeros((1, PROBE_WIDTH), np.int64),
             "attention_mask": np.ones((1, PROBE_TOTAL), np.int64),
             "position_ids": (PROBE_TOTAL - PROBE_WIDTH + np.arange(PROBE_WIDTH, dtype=np.int64))[None]}
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes], "luffy_mask_probe",
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in inputs],
        [onnx.helper.make_empty_tensor_value_info(bias.name)],
        [onnx.numpy_helper.from_array(value.const_value.numpy(), name) for name, value in constants.items()])
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    out = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=opsets)).run(
        None, {name: feeds[name] for name in inputs})[0]
    out = np.asarray(out)
    allowed = out if out.dtype == np.bool_ else out > MASKED
    return np.broadcast_to(allowed, (1, 1, PROBE_WIDTH, PROBE_TOTAL))[0, 0] if allowed.ndim == 4 else allowed


def _producers(graph: ir.Graph, value: ir.Value) -> tuple[list[ir.Node], dict[str, ir.Value], dict[str, ir.Value]]:
    """The nodes ``value`` is computed from, in graph order, with the graph inputs and constants they read."""
    found: dict[int, ir.Node] = {}
    inputs: dict[str, ir.Value] = {}
    constants: dict[str, ir.Value] = {}
    stack = [value]
    while stack:
        current = stack.pop()
        node = current.producer()
        if node is None:
            (constants if current.const_value is not None else inputs)[current.name] = current
            continue
        if id(node) not in found:
            found[id(node)] = node
            stack.extend(v for v in node.inputs if v is not None)
    order = {id(node): i for i, node in enumerate(graph)}
    return sorted(found.values(), key=lambda n: order[id(n)]), inputs, constants
