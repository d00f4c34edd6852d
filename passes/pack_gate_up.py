"""pack-gate-up: a gated MLP's gate and up projections as one MatMul, split after it.

A gated feed-forward block (SwiGLU, GeGLU: Llama, Mistral, Qwen, Phi3, Gemma) computes

    act(x @ W_gate) * (x @ W_up)

with two MatMuls reading the same activation. This pass writes  Split(x @ [W_gate | W_up])  and hands
each half to its old readers: one weight matrix per layer (one kernel and one pass over x at prefill,
one thread-pool dispatch at decode instead of two). Weight transformation (for a compile that streams its
weights): the [K, N] weights concatenated along N, gate first, then up (``matmul_packing``); biases
likewise. The activation is left to onnxruntime's own fusions (x * Sigmoid(x) -> QuickGelu at load):
its CPU provider has no kernel that takes the packed halves (com.microsoft SwiGLU is GPU-only in 1.32).

A match is a Mul whose two inputs come, one through elementwise activation nodes and one directly (or
both directly), from two MatMuls with constant weights on the same input. MoE experts are not dense
MatMuls and are left to fuse-moe.
"""

from __future__ import annotations

import onnx_ir as ir

from . import matmul_packing as packing

# Elementwise ops an activation between a projection and the gating Mul may use.
ACTIVATION_OPS = {"Sigmoid", "Mul", "Div", "Add", "Sub", "Tanh", "Erf", "Pow", "Relu", "Softplus", "Gelu", "FastGelu",
                  "QuickGelu", "BiasGelu", "Cast", "HardSigmoid", "HardSwish", "Swish"}
MAX_ACTIVATION_NODES = 8


def _activated_source(value: ir.Value) -> tuple[packing.Projection, int] | None:
    """(the projection, how many activation nodes lie between) when ``value`` is a function of one projection's
    output alone (through elementwise activation nodes); None otherwise."""
    direct = packing.projection(value)
    if not isinstance(direct, str):
        return direct, 0
    roots, seen, frontier = {}, set(), [value]
    while frontier:
        current = frontier.pop()
        source = packing.projection(current)
        if not isinstance(source, str):
            roots[id(source.output)] = source
            continue
        node = current.producer()
        if node is None or node.op_type not in ACTIVATION_OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
            return None
        if id(node) not in seen:
            seen.add(id(node))
            frontier += [v for v in node.inputs if v is not None and v.const_value is None]
        if len(seen) > MAX_ACTIVATION_NODES:
            return None
    if len(roots) != 1:
        return None
    return next(iter(roots.values())), len(seen)


def _gate_and_up(mul: ir.Node) -> list[packing.Projection] | str | None:
    """[gate, up] when ``mul`` gates one projection by another; a reason when it nearly does; None when it
    is some other Mul (most of a graph's Muls: nothing to report)."""
    if len(mul.inputs) != 2 or any(v is None for v in mul.inputs):
        return None
    sources = [_activated_source(v) for v in mul.inputs]
    if any(s is None for s in sources):
        return None
    (first, first_depth), (second, second_depth) = sources
    if first.output is second.output or (first_depth and second_depth):
        return None  # SiLU's own x * Sigmoid(x), or a product of two activations
    ordered = [first, second] if first_depth >= second_depth else [second, first]  # gate (activated) first
    return packing.siblings_reason(ordered) or ordered


class PackGateUp(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count, refusals = 0, []
        for mul in [n for n in graph if n.op_type == "Mul" and n.domain in ("", "ai.onnx")]:
            if mul.graph is None:  # removed by an earlier match
                continue
            found = _gate_and_up(mul)
            if found is None or isinstance(found, str):
                if found is not None:
                    refusals.append({"rule": "PackGateUp", "at_node": mul.name, "reason": found})
                continue
            name = f"{found[0].matmul.name}_gate_up"
            packed = packing.pack(graph, found, name)
            packing.split(graph, packed, found, name)
            packing.remove(graph, found)
            count += 1
        self.stats = {"matches": count}
        if not count:
            self.stats["not_matched"] = refusals[:3] or [{"rule": "PackGateUp", "reason": "no Mul of two projections "
                                                          "of one input (one of them activated)"}]
        return ir.passes.PassResult(model, modified=count > 0)


def pack_gate_up() -> PackGateUp:
    return PackGateUp()
