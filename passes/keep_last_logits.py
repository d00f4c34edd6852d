"""Run the lm_head only on the positions the caller keeps: a `logits_to_keep` input (int64 scalar).

Prefill of a P-token prompt otherwise multiplies all P hidden states by the vocabulary matrix, although
generation reads only the last row: for a 32k vocabulary and 1024 hidden that is 33 MFLOP per wasted
position, about a tenth of a 128-token prefill of a 156M model. The rewrite slices the hidden states to
the last `logits_to_keep` positions right before the lm_head MatMul; the runtime passes 1 when generating
and the sequence length when scoring, so one graph serves both (transformers calls this logits_to_keep).

A graph that takes ``query_seqlens`` (fuse-gqa's multi-row steps: rows right-padded to the step's width)
needs each row's own last positions, which a slice from the end cannot give: it takes ``logits_indices``
int64 [batch, kept] instead, the positions of each row to keep (the runtime passes a row's last valid ones),
gathered per row by one GatherND (batch_dims=1). One node fewer than the slice, too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .gqa_multi_row import QUERY_SEQLENS

KEEP, INDICES = "logits_to_keep", "logits_indices"
# Elementwise ops that may sit between the lm_head MatMul and the logits output (scaling, softcap, casts).
_PER_POSITION = {"Cast", "Mul", "Div", "Tanh", "Add"}


class KeepLastLogits(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        matmul, reason = find_lm_head(model.graph)
        if matmul is None:
            self.stats = {"matches": 0, "not_matched": [{"rule": "KeepLastLogits", "reason": reason}]}
            return ir.passes.PassResult(model, modified=False)
        hidden = matmul.inputs[0]
        if any(v.name == QUERY_SEQLENS for v in model.graph.inputs):  # rows right-padded: each row's own positions
            indices = ir.Value(name=INDICES, shape=ir.Shape(["batch", "kept"]), type=ir.TensorType(ir.DataType.INT64))
            model.graph.inputs.append(indices)
            nodes = _gather_kept(model.graph, hidden, indices)
        else:
            keep = ir.Value(name=KEEP, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64))
            model.graph.inputs.append(keep)
            nodes = _slice_kept(model.graph, hidden, keep)
        kept = nodes[-1].outputs[0]
        kept.dtype = hidden.dtype
        kept.shape = ir.Shape([hidden.shape[0], "kept", hidden.shape[2]])  # names the dim for shape inference
        model.graph.insert_before(matmul, nodes)
        matmul.replace_input_with(0, kept)
        logits = next(v for v in model.graph.outputs if v.name == "logits")
        logits.shape = ir.Shape(["batch", "kept", logits.shape[2] if logits.shape is not None else "vocab"])
        self.stats = {"matches": 1}
        return ir.passes.PassResult(model, modified=True)


def keep_last_logits() -> KeepLastLogits:
    return KeepLastLogits()


def _slice_kept(graph: ir.Graph, hidden: ir.Value, keep: ir.Value) -> list[ir.Node]:
    """hidden[:, -keep:]"""
    start = ir.node("Unsqueeze", [keep, _const(graph, "keep_axes", [0])])
    negated = ir.node("Neg", [start.outputs[0]])
    sliced = ir.node("Slice", [hidden, negated.outputs[0], _const(graph, "keep_end", [np.iinfo(np.int64).max]),
                               _const(graph, "keep_axis", [1])])
    return [start, negated, sliced]


def _gather_kept(graph: ir.Graph, hidden: ir.Value, indices: ir.Value) -> list[ir.Node]:
    """hidden[b, indices[b, j]]: [batch, kept, hidden]."""
    unsqueeze = ir.node("Unsqueeze", [indices, _const(graph, "keep_last", [2])])  # [batch, kept, 1]
    return [unsqueeze, ir.node("GatherND", [hidden, unsqueeze.outputs[0]], attributes={"batch_dims": 1})]


def _const(graph: ir.Graph, name: str, values) -> ir.Value:
    value = ir.Value(name=f"luffy_{name}", const_value=ir.tensor(np.array(values, dtype=np.int64)))
    value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
    graph.register_initializer(value)
    return value


def transposed_constant(value: ir.Value | None) -> ir.Value | None:
    """The 2-D constant a Transpose node turns into ``value``: a tied embedding read as the head, which the
    exporter leaves unfolded when the table is large (folding it would store the table twice)."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    source = producer.inputs[0]
    perm = producer.attributes.get("perm")
    if source is None or source.const_value is None or len(source.const_value.shape) != 2:
        return None
    return source if perm is None or list(perm.as_ints()) == [1, 0] else None


def find_lm_head(graph: ir.Graph, allow_kept: bool = False) -> tuple[ir.Node | None, str]:
    """The MatMul whose [batch, seq, hidden] input becomes the logits, through per-position ops only.

    ``allow_kept`` finds it in a graph this pass already rewrote (quantization wants the lm_head too).
    """
    names = {v.name for v in graph.inputs}
    if (KEEP in names or INDICES in names) and not allow_kept:
        return None, "graph already keeps its last logits (logits_to_keep / logits_indices)"
    if "input_ids" not in names or not any(n.startswith("past_key_values.") for n in names):
        return None, "not a decoder step graph (needs input_ids and past_key_values inputs)"
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if logits is None:
        return None, "graph has no logits output"
    value = logits
    for _ in range(8):
        node = value.producer()
        if node is None:
            break
        if node.op_type == "MatMul":
            weight, hidden = node.inputs[1], node.inputs[0]
            if weight is None or (weight.const_value is None and transposed_constant(weight) is None):
                return None, f"{node.name}: lm_head weight is not a constant"
            if hidden.shape is None or hidden.shape.rank() != 3:
                return None, f"{node.name}: lm_head input is not [batch, seq, hidden] ({hidden.shape})"
            return node, ""
        if node.op_type not in _PER_POSITION or len(value.uses()) > (0 if value is logits else 1):
            return None, f"{node.name}: {node.op_type} between the lm_head and the logits is not per-position"
        others = [i for i in node.inputs[1:] if i is not None and i.const_value is None]
        if others:
            return None, f"{node.name}: {node.op_type} mixes in a non-constant ({others[0].name})"
        value = node.inputs[0]
    return None, "no MatMul found feeding the logits"
