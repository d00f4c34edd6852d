"""Decoder attention over the explicit KV cache -> com.microsoft GroupQueryAttention on a shared buffer.

Per layer the step graph computes  present = Concat(past, new)  (a copy of the whole cache per step), then
repeats KV heads for GQA (Unsqueeze/Expand/Reshape, another copy) and runs attention. This pass replaces
all of that with one GroupQueryAttention that writes the new keys/values in place into a preallocated
buffer bound as both past and present (ORT's past_present_share_buffer mode) and reads the KV heads
unrepeated. The model's own mask is kept and passed as attention_bias (causal=0 unless below), so every masking
rule the model had (padding, sliding windows, whatever its mask subgraph computes) holds unchanged.

Why luffy's own and not a pattern rule: this rewrite changes the graph's interface, not a local
subgraph. past_key_values.N.* become capacity-sized buffers (dim 2 "max_seq"), present.N.* alias them,
two inputs are added (seqlens_k int32 [batch] = total - 1, total_sequence_length int32 scalar), and every
Shape read of a past input is re-derived from attention_mask (past = mask length - new tokens), since the
buffer's dim 2 is no longer the past length. It is all-or-nothing: one layer that does not match leaves
the whole graph untouched, with the reason in the report.

Where the installed onnxruntime and the model's mask allow it (gqa_multi_row.py), the graph also takes
``query_seqlens`` int32 [batch] (each row's valid tokens in a right-padded step) and attention runs with
causal=1, so one step holds several rows of several tokens with a cache; the stats say which, and why not.
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from .gqa_multi_row import QUERY_SEQLENS, QUERY_SEQLENS_INDEX, mask_rule_refusal, ort_takes_query_seqlens

FUSION_DOMAIN = "ai.onnxruntime._fusion"  # where onnxscript's fuse-sdpa puts its SDPA node
SEQLENS = "seqlens_k"
TOTAL = "total_sequence_length"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_REPEAT_KV = ("Unsqueeze", "Expand", "Reshape")


class NoMatch(Exception):
    """A reason the rewrite refuses, naming the value or node at fault."""


class FuseGroupQueryAttention(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        # fuse-sdpa leaves the decomposed attention's shape reads dangling; they would look like extra
        # readers of the cache.
        cleaned = common.RemoveUnusedNodesPass()(model).modified
        try:
            layers = _past_inputs(graph)
            plans = [_match_layer(graph, layer, pair) for layer, pair in sorted(layers.items())]
        except NoMatch as reason:
            self.stats = {"matches": 0, "not_matched": [{"rule": "GroupQueryAttention", "reason": str(reason)}]}
            return ir.passes.PassResult(model, modified=cleaned)
        rewriter = _Rewriter(model)
        rewriter.prepare(layers, plans)
        # after prepare: the mask no longer reads the past buffers' shapes, only input_ids and attention_mask
        refusal = ort_takes_query_seqlens() or mask_rule_refusal(model, [plan["sdpa"].inputs[3] for plan in plans])
        rewriter.apply(layers, plans, multi_row=refusal is None)
        # The replaced concat / repeat-KV / attention nodes must go now, not at the end of the pipeline: the
        # old Concat reads the capacity-sized buffer and would fail if anything executed it.
        common.RemoveUnusedNodesPass()(model)
        self.stats = {"matches": len(plans), "multi_row": refusal is None}
        if refusal is not None:
            self.stats["not_matched"] = [{"rule": QUERY_SEQLENS, "reason": refusal}]
        return ir.passes.PassResult(model, modified=True)


def fuse_gqa() -> FuseGroupQueryAttention:
    return FuseGroupQueryAttention()


def _past_inputs(graph: ir.Graph) -> dict[int, dict[str, ir.Value]]:
    names = {v.name for v in graph.inputs}
    if SEQLENS in names:
        raise NoMatch("graph already uses a shared-buffer KV cache")
    if "input_ids" not in names or "attention_mask" not in names:
        raise NoMatch("not a decoder step graph (needs input_ids and attention_mask inputs)")
    layers: dict[int, dict[str, ir.Value]] = {}
    for value in graph.inputs:
        m = _PAST.match(value.name or "")
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers:
        raise NoMatch("graph has no past_key_values.N.key/value inputs")
    return layers


def _single_use(value: ir.Value, op_type: str) -> ir.Node | None:
    users = [u.node for u in value.uses()]
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _attention_input(present: ir.Value, graph: ir.Graph) -> tuple[ir.Node, int]:
    """Follow present through an optional repeat-KV chain to the SDPA node reading it: (node, input index)."""
    value = present
    users = [u for u in value.uses() if u.node.op_type != "Shape"]  # Shape reads are re-derived
    for op_type in _REPEAT_KV:
        if len(users) == 1 and users[0].node.op_type == "SDPA":
            break
        nxt = _single_use(value, op_type)
        if nxt is None:
            break
        value = nxt.outputs[0]
        users = list(value.uses())
    sdpa = [u for u in users if u.node.op_type == "SDPA" and u.node.domain == FUSION_DOMAIN]
    if len(users) != 1 or len(sdpa) != 1:
        raise NoMatch(f"{present.name} is not read by exactly one fused attention (after repeat-KV); "
                      f"readers: {[u.node.op_type for u in users]}")
    return sdpa[0].node, sdpa[0].idx


def _match_layer(graph: ir.Graph, layer: int, pair: dict[str, ir.Value]) -> dict:
    if set(pair) != {"key", "value"}:
        raise NoMatch(f"layer {layer}: past key/value inputs incomplete")
    outputs = {v.name: v for v in graph.outputs}
    plan = {"layer": layer}
    for kind, past in pair.items():
        concats = [u.node for u in past.uses() if u.node.op_type == "Concat"]
        others = [u.node for u in past.uses() if u.node.op_type not in ("Concat", "Shape")]
        if len(concats) != 1 or others:
            raise NoMatch(f"{past.name}: expected one Concat with the new {kind}s (plus Shape reads), found "
                          f"{[u.node.op_type for u in past.uses()]}")
        concat = concats[0]
        axis = concat.attributes["axis"].value
        if list(concat.inputs) != [past, concat.inputs[1]] or axis not in (2, -2):
            raise NoMatch(f"{concat.name}: past is not concatenated first along the sequence axis")
        present = concat.outputs[0]
        if outputs.get(f"present.{layer}.{kind}") is not present:
            raise NoMatch(f"{concat.name}: its output is not the graph output present.{layer}.{kind}")
        sdpa, index = _attention_input(present, graph)
        plan[kind] = {"past": past, "concat": concat, "new": concat.inputs[1], "sdpa": sdpa, "index": index}
    sdpa = plan["key"]["sdpa"]
    if plan["value"]["sdpa"] is not sdpa or (plan["key"]["index"], plan["value"]["index"]) != (1, 2):
        raise NoMatch(f"layer {layer}: key and value do not feed the same attention as its key and value")
    if sdpa.attributes.get("key_format") is None or sdpa.attributes["key_format"].value != "BHSd":
        raise NoMatch(f"{sdpa.name}: key layout is not [batch, heads, seq, dim]")
    if len(sdpa.inputs) < 4 or sdpa.inputs[3] is None:
        raise NoMatch(f"{sdpa.name}: attention without a mask; refusing to assume plain causal semantics")
    past_shape = plan["key"]["past"].shape
    query_shape = sdpa.inputs[0].shape
    if past_shape is None or query_shape is None or not isinstance(query_shape[1], int):
        raise NoMatch(f"{sdpa.name}: query head count is not static ({query_shape})")
    kv_heads, head_dim, heads = past_shape[1], past_shape[3], query_shape[1]
    if not all(isinstance(d, int) for d in (kv_heads, head_dim)) or heads % kv_heads:
        raise NoMatch(f"layer {layer}: {heads} query heads cannot share {kv_heads} KV heads")
    scale = sdpa.attributes.get("scale")
    plan.update(sdpa=sdpa, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                scale=scale.value if scale is not None else 1.0 / math.sqrt(head_dim))
    return plan


class _Rewriter:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.counter = 0

    def const(self, array, name: str) -> ir.Value:
        self.counter += 1
        value = ir.Value(name=f"luffy_gqa_{name}_{self.counter}", const_value=ir.tensor(np.asarray(array)))
        value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
        self.graph.register_initializer(value)
        return value

    def prepare(self, layers, plans) -> None:
        """Add seqlens_k and total_sequence_length, and re-derive every Shape read of the cache."""
        self.seqlens = ir.Value(name=SEQLENS, shape=ir.Shape(["batch"]), type=ir.TensorType(ir.DataType.INT32))
        self.total = ir.Value(name=TOTAL, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT32))
        self.graph.inputs.extend([self.seqlens, self.total])
        self._rederive_shapes(layers, plans)

    def apply(self, layers, plans, multi_row: bool) -> None:
        counts = None
        if multi_row:
            counts = ir.Value(name=QUERY_SEQLENS, shape=ir.Shape(["batch"]), type=ir.TensorType(ir.DataType.INT32))
            self.graph.inputs.append(counts)
        for plan in plans:
            self._rewrite_layer(plan, self.seqlens, self.total, counts)
        for pair in layers.values():
            for past in pair.values():
                past.shape = ir.Shape(["batch", past.shape[1], "max_seq", past.shape[3]])

    def _rederive_shapes(self, layers, plans) -> None:
        """Shape reads of past meant [batch, heads, past_len, dim] and of present [batch, heads, total, dim];
        with capacity-sized buffers neither holds, so rebuild both from input_ids and attention_mask."""
        graph = self.graph
        inputs = {v.name: v for v in graph.inputs}
        reads = [(past, "past", u.node) for pair in layers.values() for past in pair.values() for u in past.uses()
                 if u.node.op_type == "Shape"]
        reads += [(plan[kind]["concat"].outputs[0], "total", u.node) for plan in plans for kind in ("key", "value")
                  for u in plan[kind]["concat"].outputs[0].uses() if u.node.op_type == "Shape"]
        if not reads:
            return
        nodes: list[ir.Node] = []

        def node(op, *args, **attrs):
            n = ir.node(op, list(args), attributes=attrs)
            nodes.append(n)
            return n.outputs[0]

        batch = node("Shape", inputs["input_ids"], start=0, end=1)
        seq = node("Shape", inputs["input_ids"], start=1, end=2)
        lengths = {"total": node("Shape", inputs["attention_mask"], start=1, end=2)}
        lengths["past"] = node("Sub", lengths["total"], seq)
        graph.insert_before(next(iter(graph)), nodes)
        for source, length, shape_node in reads:
            del nodes[:]
            dims = node("Concat", batch, self.const(np.array([source.shape[1]], np.int64), "heads"), lengths[length],
                        self.const(np.array([source.shape[3]], np.int64), "dim"), axis=0)
            start = shape_node.attributes.get("start")
            end = shape_node.attributes.get("end")
            sliced = node("Slice", dims, self.const(np.array([start.value if start else 0], np.int64), "start"),
                          self.const(np.array([end.value if end else 4], np.int64), "end"))
            graph.insert_before(shape_node, nodes)
            ir.convenience.replace_all_uses_with(shape_node.outputs[0], sliced)

    def _to_bsd(self, value: ir.Value, before: ir.Node) -> ir.Value:
        transpose = ir.node("Transpose", [value], attributes={"perm": [0, 2, 1, 3]})
        reshape = ir.node("Reshape", [transpose.outputs[0], self.const(np.array([0, 0, -1], np.int64), "bsd")])
        self.graph.insert_before(before, [transpose, reshape])
        return reshape.outputs[0]

    def _rewrite_layer(self, plan, seqlens, total, counts) -> None:
        graph, sdpa, layer = self.graph, plan["sdpa"], plan["layer"]
        query = self._to_bsd(sdpa.inputs[0], sdpa)
        key = self._to_bsd(plan["key"]["new"], sdpa)
        value = self._to_bsd(plan["value"]["new"], sdpa)
        inputs = [query, key, value, plan["key"]["past"], plan["value"]["past"], seqlens, total,
                  None, None, None, sdpa.inputs[3]]
        if counts is not None:  # query_seqlens needs the op's own (per-row) causal rule besides the model's mask
            inputs += [None] * (QUERY_SEQLENS_INDEX - len(inputs)) + [counts]
        gqa = ir.node(
            "GroupQueryAttention", inputs,
            attributes={"num_heads": plan["heads"], "kv_num_heads": plan["kv_heads"], "scale": float(plan["scale"]),
                        "causal": int(counts is not None)},
            domain="com.microsoft", num_outputs=3, name=f"luffy_gqa_{layer}",
        )
        bhsd = next((v.shape for v in (sdpa.outputs[0], sdpa.inputs[0]) if v.shape is not None and len(v.shape) == 4), None)
        if bhsd is not None:  # later passes prove Reshape round trips with it
            gqa.outputs[0].shape = ir.Shape([bhsd[0], bhsd[2], plan["heads"] * plan["head_dim"]])
        gqa.outputs[0].dtype = sdpa.outputs[0].dtype
        # The model's consumers expect [B, H, S, d]; hand them that view of GQA's [B, S, H*d] output (the
        # Transpose pair this creates cancels in the cleanup that follows).
        unflatten = ir.node("Reshape", [gqa.outputs[0], self.const(np.array([0, 0, plan["heads"], plan["head_dim"]], np.int64), "bshd")])
        to_bhsd = ir.node("Transpose", [unflatten.outputs[0]], attributes={"perm": [0, 2, 1, 3]})
        graph.insert_before(sdpa, [gqa, unflatten, to_bhsd])
        ir.convenience.replace_all_uses_with(sdpa.outputs[0], to_bhsd.outputs[0])
        for kind, out in (("key", gqa.outputs[1]), ("value", gqa.outputs[2])):
            old = plan[kind]["concat"].outputs[0]
            name = old.name
            old.name = f"{name}.concat"
            out.name = name
            out.dtype = old.dtype
            out.shape = ir.Shape(["batch", plan["kv_heads"], "max_seq", plan["head_dim"]])
            graph.outputs[graph.outputs.index(old)] = out
        self.model.opset_imports.setdefault("com.microsoft", 1)
