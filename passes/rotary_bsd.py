"""Rotary on [batch, seq, heads*dim] directly: drop the Reshape/Transpose pairs around it once GQA is in.

After fuse-gqa, each of q and k takes the path
    MatMul [B,S,H*d] -> Reshape [B,S,H,d] -> Transpose [B,H,S,d] -> RotaryEmbedding
                     -> Transpose [B,S,H,d] -> Reshape [B,S,H*d] -> GroupQueryAttention
because the model rotates in head layout and GQA reads the flat one. com.microsoft's RotaryEmbedding
takes the flat layout too, so the four data movements per projection (eight per layer, each a copy of
the activations at prefill and a kernel launch at decode) go away. Where something other than the
projection's Reshape produces the head layout (Qwen3's per-head q/k norm), one Reshape to the flat
layout replaces the three. Partial rotary written as rotate(x[..., :r]) concatenated with x[..., r:]
(Phi3) becomes the op's own rotary_embedding_dim=r. GPT-NeoX, which slices q, k and v out of one
head-layout tensor, does not match: its rotary input is no Transpose of a [B,S,H,d] value.

This pass keeps the rotation a node of its own: GQA's prompt path reads only the first element of
position_ids, so rows of a left-padded batch, whose positions start at different offsets, would rotate
wrongly there. pack-qkv, which runs next, folds it into GQA without position_ids (GQA then numbers
positions by KV buffer index, which leaves RoPE's scores unchanged; see pack_qkv.py). The rewrite is
proven by shapes: the Reshape must keep batch and sequence dims (same symbols) and only split the last one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

MS = "com.microsoft"


def _single_user(value: ir.Value, op_type: str) -> ir.Node | None:
    users = list(value.uses())
    if len(users) == 1 and users[0].node.op_type == op_type and not value.is_graph_output():
        return users[0].node
    return None


def _is_swap_12(node: ir.Node | None) -> bool:
    perm = node.attributes.get("perm") if node is not None and node.op_type == "Transpose" else None
    return perm is not None and list(perm.value) == [0, 2, 1, 3]


def _flat_source(head_layout: ir.Value) -> ir.Value | None:
    """x when ``head_layout`` = Reshape(x [B,S,H*d]) -> [B,S,H,d] with B, S the same dims."""
    reshape = head_layout.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    flat, split = reshape.inputs[0], head_layout.shape
    if flat is None or flat.shape is None or split is None or len(flat.shape) != 3 or len(split) != 4:
        return None
    if list(flat.shape)[:2] != list(split)[:2] or not all(isinstance(d, int) for d in (split[2], split[3], flat.shape[2])):
        return None
    return flat if split[2] * split[3] == flat.shape[2] else None


def _last_axis_slice(node: ir.Node | None) -> tuple[int, int] | None:
    """(start, end) of a step-1 Slice over the last axis of a rank-4 value with constant bounds."""
    if node is None or node.op_type != "Slice" or len(node.inputs) < 4:
        return None
    consts = [v.const_value.numpy().reshape(-1).tolist() if v is not None and v.const_value is not None else None
              for v in node.inputs[1:5]]
    starts, ends, axes = consts[:3]
    steps = consts[3] if len(consts) > 3 else [1]
    if None in (starts, ends, axes) or steps not in (None, [1]) or len(starts) != 1 or axes[0] not in (3, -1):
        return None
    return starts[0], ends[0]


def _partial_rotary(rotary: ir.Node, sliced: ir.Node):
    """Phi3 / GPT-NeoX: rotary on x[..., :r] of the head layout, concatenated back with x[..., r:].

    Returns (the Transpose into head layout, the Concat's output, r), or the reason it is not that.
    """
    bounds = _last_axis_slice(sliced)
    if bounds is None or bounds[0] != 0:
        return "its input is a Slice, but not x[..., :r] over the last axis"
    rotary_dim = bounds[1]
    head_layout = sliced.inputs[0]
    concat = _single_user(rotary.outputs[0], "Concat")
    if concat is None or concat.attributes["axis"].value not in (3, -1) or len(concat.inputs) != 2 \
            or concat.inputs[0] is not rotary.outputs[0]:
        return "a partial rotary whose output is not concatenated back first along the last axis"
    rest = concat.inputs[1].producer()
    rest_bounds = _last_axis_slice(rest)
    if rest is None or rest.inputs[0] is not head_layout or rest_bounds is None or rest_bounds[0] != rotary_dim \
            or not isinstance(head_layout.shape[3], int) or rest_bounds[1] < head_layout.shape[3]:
        return "a partial rotary not rejoined with the rest of the same head (x[..., r:])"
    return head_layout.producer(), concat.outputs[0], rotary_dim


def _flatten_back(rotated: ir.Value) -> ir.Node | None:
    """The Reshape(Transpose(rotated), [0, 0, -1]) that fuse-gqa put before GQA, if that is all that reads it."""
    transpose = _single_user(rotated, "Transpose")
    if not _is_swap_12(transpose):
        return None
    reshape = _single_user(transpose.outputs[0], "Reshape")
    if reshape is None or reshape.inputs[1] is None or reshape.inputs[1].const_value is None:
        return None
    return reshape if list(reshape.inputs[1].const_value.numpy()) == [0, 0, -1] else None


def _flatten(graph: ir.Graph, head_layout: ir.Value, before: ir.Node) -> ir.Value:
    """Reshape(head_layout [B,S,H,d], [0, 0, -1]) -> [B,S,H*d], inserted before ``before``."""
    target = ir.Value(name=f"{head_layout.name}_bsd_shape", const_value=ir.tensor(np.array([0, 0, -1], np.int64)))
    target.shape, target.dtype = ir.Shape([3]), ir.DataType.INT64
    graph.register_initializer(target)
    reshape = ir.node("Reshape", [head_layout, target], name=f"{head_layout.name}_to_bsd")
    dims = list(head_layout.shape)
    merged = dims[2] * dims[3] if isinstance(dims[2], int) and isinstance(dims[3], int) else None
    if merged is not None:
        reshape.outputs[0].shape = ir.Shape([dims[0], dims[1], merged])
    reshape.outputs[0].dtype = head_layout.dtype
    graph.insert_before(before, reshape)
    return reshape.outputs[0]


class RotaryOnFlatLayout(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count, refusals = 0, []
        for rotary in [n for n in model.graph if n.op_type == "RotaryEmbedding" and n.domain == MS]:
            reason = self._rewrite(model.graph, rotary)
            if reason is None:
                count += 1
            elif len(refusals) < 3:
                refusals.append({"rule": "RotaryOnFlatLayout", "at_node": rotary.name, "reason": reason})
        self.stats = {"matches": count}
        if not count:
            self.stats["not_matched"] = refusals or [{"rule": "RotaryOnFlatLayout", "reason": "no com.microsoft RotaryEmbedding"}]
        return ir.passes.PassResult(model, modified=count > 0)

    @staticmethod
    def _rewrite(graph: ir.Graph, rotary: ir.Node) -> str | None:
        into, rotated, partial_dim = rotary.inputs[0].producer(), rotary.outputs[0], 0
        if into is not None and into.op_type == "Slice":
            partial = _partial_rotary(rotary, into)
            if isinstance(partial, str):
                return partial
            into, rotated, partial_dim = partial
        if not _is_swap_12(into):
            return "its input is not a [B,S,H,d] -> [B,H,S,d] Transpose"
        head_layout = into.inputs[0]
        if head_layout.shape is None or len(head_layout.shape) != 4:
            return f"{head_layout.name} has no known rank-4 [B,S,H,d] shape"
        back = _flatten_back(rotated)
        if back is None:
            return "its output is not only flattened back to [B,S,H*d] (Transpose + Reshape [0,0,-1])"
        attributes = {name: attr.value for name, attr in rotary.attributes.items()}
        if attributes.get("is_packed_batching"):
            return "packed batching"
        if partial_dim:
            if attributes.get("rotary_embedding_dim"):
                return "a partial rotary of a slice that is itself partial"
            # the op rotates the first rotary_embedding_dim of each head and passes the rest through
            attributes["rotary_embedding_dim"] = partial_dim
        if attributes.get("rotary_embedding_dim"):
            # partial rotary on the flat layout needs the head count to find each head's slice
            if not isinstance(head_layout.shape[2], int):
                return f"partial rotary with a symbolic head count ({head_layout.shape[2]})"
            attributes["num_heads"] = head_layout.shape[2]
        flat = _flat_source(head_layout)
        if flat is None:
            # e.g. Qwen3's per-head q/k norm sits between the projection and the split: flatten its output
            # (one Reshape instead of the Transpose pair and the Reshape back)
            flat = _flatten(graph, head_layout, before=rotary)
        flat_rotary = ir.node("RotaryEmbedding", [flat, *rotary.inputs[1:]], attributes=attributes,
                              domain=MS, name=f"{rotary.name}_bsd")
        flat_rotary.outputs[0].shape, flat_rotary.outputs[0].dtype = flat.shape, flat.dtype
        graph.insert_before(rotary, flat_rotary)
        ir.convenience.replace_all_uses_with(back.outputs[0], flat_rotary.outputs[0])
        return None


def rotary_bsd() -> RotaryOnFlatLayout:
    return RotaryOnFlatLayout()
