"""pack-qkv: each attention's Q, K and V projections as one MatMul that GroupQueryAttention reads packed.

After fuse-gqa, rotary-bsd and collapse-reshapes a layer reads

    x -> MatMul(Wq) [+ bq] -> RotaryEmbedding -> GQA.query
    x -> MatMul(Wk) [+ bk] -> RotaryEmbedding -> GQA.key
    x -> MatMul(Wv) [+ bv] ------------------> GQA.value

and this pass writes  x -> MatMul([Wq | Wk | Wv]) [+ [bq | bk | bv]] -> GQA(packed QKV, do_rotary=1):
six nodes become two (onnxruntime-genai's builder emits the same), and decode reads one weight
matrix per layer instead of three. Weight transformation (for a compile that streams its weights):
the [K, N] weights concatenated along N in the order q, k, v (``matmul_packing``), biases likewise; the
rotary's cos/sin caches become GQA's cos_cache/sin_cache unchanged.

Moving the rotation into GQA changes which position it uses: GQA rotates by the position in the KV
buffer (past length + s), not by position_ids. RoPE scores depend only on the difference of the query's
and key's positions, and within one buffer row both numberings differ by the same constant (the left
padding before the row's first real token), so the attention is the same: left-padded batches, ragged
decode steps and chunked prefill keep their outputs (tested to 1e-4 against PyTorch). What does not
keep them is a mask with a hole in the middle of a row, whose later tokens transformers numbers from
the count of real tokens; ``luffy.load`` refuses such a mask for graphs without position_ids (see
runtimes/ort_slots.py). The position_ids input is dropped when nothing else reads it.

Where the rotation is one GQA's cannot replace (partial, scaled), the three MatMuls are still packed into
one and a Split hands the rotaries and GQA their inputs (one node fewer per layer, one weight read).
Where something else sits between a projection and the rotary (Qwen3's per-head q/k norm), the layer is
left as it is, with the reason in the report.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from . import matmul_packing as packing

MS = "com.microsoft"


def _rotary_reason(q_rot: ir.Node, k_rot: ir.Node) -> str | None:
    """Why GQA's own rotary (do_rotary=1) cannot replace these two RotaryEmbedding nodes, or None."""
    if list(q_rot.inputs[1:4]) != list(k_rot.inputs[1:4]):
        return "q and k rotate with different positions or caches"
    attrs = [{k: a.value for k, a in n.attributes.items()} for n in (q_rot, k_rot)]
    if attrs[0].get("interleaved", 0) != attrs[1].get("interleaved", 0):
        return "q and k rotate in different patterns"
    if any(a.get("rotary_embedding_dim", 0) or a.get("is_packed_batching", 0) or a.get("scale", 1.0) != 1.0
           for a in attrs):
        return "partial, scaled or packed-batch rotary (GQA's rotary covers whole heads)"
    if any(len(list(n.outputs[0].uses())) != 1 or n.outputs[0].is_graph_output() for n in (q_rot, k_rot)):
        return "a rotated q or k has readers besides GQA"
    if q_rot.inputs[2] is None or q_rot.inputs[3] is None:
        return "the rotary has no cos/sin caches"
    return None


def _plan(gqa: ir.Node) -> dict | str:
    """The projections behind one GQA and whether its rotary moves inside, or why nothing can be packed."""
    q_in, k_in, v_in = (gqa.inputs[i] if len(gqa.inputs) > i else None for i in range(3))
    if k_in is None or v_in is None:
        return "GQA already reads packed QKV"
    q_rot, k_rot = q_in.producer(), k_in.producer()
    rotated = [n is not None and n.op_type == "RotaryEmbedding" and n.domain == MS for n in (q_rot, k_rot)]
    if any(rotated) and not all(rotated):
        return "only one of q and k is rotated by RotaryEmbedding"
    rotary, why_split = None, None
    sources = [q_in, k_in, v_in]
    if all(rotated):
        sources = [q_rot.inputs[0], k_rot.inputs[0], v_in]
        why_split = _rotary_reason(q_rot, k_rot)
        rotary = (q_rot, k_rot) if why_split is None else None
    projections = [packing.projection(v) for v in sources]
    reason = next((p for p in projections if isinstance(p, str)), None) or packing.siblings_reason(projections)
    if reason:
        return reason
    if why_split is None and not all(p.single_reader for p in projections):
        why_split, rotary = "a projection has readers besides the rotary / GQA", None
    return {"projections": projections, "rotary": rotary, "packed_into_gqa": why_split is None, "why_split": why_split}


class PackQkv(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        # the layout passes before this one leave their replaced nodes; they would look like extra readers
        common.RemoveUnusedNodesPass()(model)
        into_gqa, with_split, refusals = 0, 0, []
        for gqa in [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS]:
            plan = _plan(gqa)
            if isinstance(plan, str):
                refusals.append({"rule": "PackQkv", "at_node": gqa.name, "reason": plan})
                continue
            name = f"{gqa.name}_qkv"
            packed = packing.pack(graph, plan["projections"], name)
            if plan["packed_into_gqa"]:
                self._into_gqa(graph, gqa, packed, plan["rotary"])
                into_gqa += 1
            else:
                packing.split(graph, packed, plan["projections"], name)
                with_split += 1
                refusals.append({"rule": "PackQkv into GQA", "at_node": gqa.name, "reason": plan["why_split"]})
            packing.remove(graph, plan["projections"])
        positions_dropped = _drop_unread_positions(graph)
        self.stats = {"matches": into_gqa + with_split, "packed_into_gqa": into_gqa, "packed_with_split": with_split,
                      "position_ids_dropped": positions_dropped}
        if refusals:
            self.stats["not_matched"] = refusals[:3]
        return ir.passes.PassResult(model, modified=bool(into_gqa or with_split))

    @staticmethod
    def _into_gqa(graph: ir.Graph, gqa: ir.Node, packed: ir.Value, rotary: tuple[ir.Node, ir.Node] | None) -> None:
        inputs = list(gqa.inputs) + [None] * max(0, 10 - len(gqa.inputs))
        inputs[0:3] = [packed, None, None]
        if rotary is not None:
            q_rot = rotary[0]
            inputs[7], inputs[8], inputs[9] = q_rot.inputs[2], q_rot.inputs[3], None  # cos, sin; positions: the buffer's
        attributes = {k: a.value for k, a in gqa.attributes.items()}
        if rotary is not None:
            attributes["do_rotary"] = 1
            attributes["rotary_interleaved"] = q_rot.attributes["interleaved"].value if "interleaved" in q_rot.attributes else 0
        fused = ir.node("GroupQueryAttention", inputs, attributes=attributes, domain=MS, num_outputs=len(gqa.outputs),
                        name=f"{gqa.name}_packed")
        graph.insert_before(gqa, fused)
        for old, new in zip(gqa.outputs, fused.outputs):
            new.dtype, new.shape = old.dtype, old.shape
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            name, old.name = old.name, None
            new.name = name
        graph.remove([gqa, *(rotary or ())], safe=True)


def _drop_unread_positions(graph: ir.Graph) -> bool:
    """position_ids leaves the interface once no node reads it: the runtime then stops computing it."""
    for value in list(graph.inputs):
        if value.name == "position_ids" and not list(value.uses()):
            graph.inputs.remove(value)
            return True
    return False


def pack_qkv() -> PackQkv:
    return PackQkv()
