"""Reshape(Reshape(x, a), b) whose result provably has x's shape becomes x.

fuse-gqa hands GQA's inputs and output over in its own [B,S,H*d] layout; where the model had just split
that same layout into heads ([B,S,H,d]), the two Reshapes undo each other: per layer, one on v going in
and one on the attention output going to o_proj. onnxscript's reshape-reshape rule merges two Reshapes
into one, but cannot see that the merged one is the identity when the dims are symbolic (batch, seq).
This rule compares shapes symbol by symbol, resolving b's 0 (copy) and -1 (infer) entries against the
middle value's shape, and only removes the pair when every dim is proven equal.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir


def _dims(shape: ir.Shape | None) -> list | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if d.value is not None else None) for d in shape]


def _resolve(target: list[int], middle: list) -> list | None:
    """Reshape's output dims for shape ``target`` applied to a value of dims ``middle`` (allowzero=0)."""
    out = [middle[i] if t == 0 and i < len(middle) else t for i, t in enumerate(target)]
    if any(d is None for d in out) or out.count(-1) > 1:
        return None
    if -1 in out:
        # symbols of the input cancel against the same symbols in the output; the rest must be integers
        numerator = Counter(d for d in middle if not isinstance(d, int))
        denominator = Counter(d for d in out if not isinstance(d, int))
        if denominator - numerator or numerator - denominator:
            return None
        known = 1
        for d in out:
            if isinstance(d, int) and d != -1:
                known *= d
        total = 1
        for d in middle:
            if isinstance(d, int):
                total *= d
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return out


def _round_trip_source(node: ir.Node) -> ir.Value | None:
    inner = node.inputs[0].producer() if node.inputs[0] is not None else None
    if inner is None or inner.op_type != "Reshape":
        return None
    source, middle = inner.inputs[0], inner.outputs[0]
    want, mid = _dims(source.shape), _dims(middle.shape)
    if want is None or None in want:
        return None
    got = _dims(node.outputs[0].shape)
    target = node.inputs[1]
    if (got is None or None in got) and mid is not None and target is not None and target.const_value is not None:
        entries = [int(v) for v in target.const_value.numpy().reshape(-1)]
        allowzero = node.attributes.get("allowzero")
        if allowzero is not None and allowzero.value and 0 in entries:
            return None  # a literal 0-sized dim, not a copy
        got = _resolve(entries, mid)
    return source if got == want else None


class CollapseReshapeRoundTrips(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in [n for n in model.graph if n.op_type == "Reshape" and n.domain in ("", "ai.onnx")]:
            source = _round_trip_source(node)
            if source is None or node.outputs[0].is_graph_output():
                continue
            ir.convenience.replace_all_uses_with(node.outputs[0], source)
            count += 1
        self.stats = {"matches": count}
        if not count:
            self.stats["not_matched"] = [{"rule": "CollapseReshapeRoundTrips",
                                          "reason": "no Reshape pair whose result provably equals its source's shape"}]
        return ir.passes.PassResult(model, modified=count > 0)


def collapse_reshapes() -> CollapseReshapeRoundTrips:
    return CollapseReshapeRoundTrips()
