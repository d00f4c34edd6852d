"""Top-k mixture-of-experts SwiGLU block -> one com.microsoft MoE.

luffy captures transformers' experts through their "batched_mm" path (compiler/capture.py), which exports
per layer as: Softmax(router logits) -> TopK (-> divide by the top-k sum) for the routing, every token
repeated k times, each copy's expert weights gathered out of the stacked [E, 2I, H] gate_up and
[E, H, I] down tensors (GatherND: a copy of k whole expert matrices per token), two batched MatMuls with
silu(gate) * up between them, the k outputs weighted and summed. ORT's MoE takes the router logits and the
stacked weights as they are and runs only the selected experts, without copying their weights.

The rule checks every constant that decides which rows meet which expert (the k of TopK and of the
repeat, the flatten and sum axes), so a block routed any other way is left alone. The op's CPU kernel
(ORT 1.32, moe_cpu.cc) accepts SwiGLU only with gate and up interleaved row by row (swiglu_fusion=1;
"CPU MoE only supports interleaved SwiGLU format"), so fc1 is gate_up with its rows interleaved at
compile time; activation_alpha=1, activation_beta=0 and no swiglu_limit make the op's SwiGLU
silu(gate) * up exactly. ORT applies the softmax and top-k itself, from the same logits. Whether the
installed onnxruntime's CPU provider runs that node is asked of it once (a one-node probe session); where
it does not, every block stays unfused and the report says why.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet, pattern

from .rule_pass import RulePass

_LAST = (-1,)


def _ints(value: ir.Value | None) -> tuple[int, ...] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tuple(int(v) for v in tensor.numpy().reshape(-1))


class TopKSwiGLUExperts(pattern.RewriteRuleClassBase):
    """out[t] = sum_j w[t, j] * down[e_j] @ (silu(gate[e_j] @ x[t]) * up[e_j] @ x[t]), (w, e) = topk(softmax)."""

    def __init__(self, normalized: bool):
        super().__init__(name="MoE_normalized" if normalized else "MoE")
        self._normalized = normalized

    def pattern(self, op, x, logits, k, gate_up, down, sum_k_axes, repeat_axes, repeat_shape, repeat_flat,
                ids_flat, ids_axes, col_axes, row_axes, weight_flat, weight_axes, out_shape, out_axes):
        weights, ids = op.TopK(op.Softmax(logits, axis=-1), k, axis=-1, largest=1, _outputs=2)
        if self._normalized:
            weights = op.Div(weights, op.ReduceSum(weights, sum_k_axes, keepdims=1))
        tokens = op.Reshape(op.Expand(op.Unsqueeze(x, repeat_axes), repeat_shape), repeat_flat)  # k copies each
        experts = op.Unsqueeze(op.Reshape(ids, ids_flat), ids_axes)  # [T*k, 1] rows for GatherND
        gate_up_x = op.Squeeze(op.MatMul(op.GatherND(gate_up, experts, batch_dims=0),
                                         op.Unsqueeze(tokens, col_axes)), col_axes)
        gate, up = op.Split(gate_up_x, axis=1, num_outputs=2, _outputs=2)
        hidden = op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
        out = op.Squeeze(op.MatMul(op.GatherND(down, experts, batch_dims=0), op.Unsqueeze(hidden, row_axes)),
                         row_axes)
        weighted = op.Mul(out, op.Unsqueeze(op.Reshape(weights, weight_flat), weight_axes))
        return op.ReduceSum(op.Reshape(weighted, out_shape), out_axes, keepdims=0)

    def check(self, context, x, logits, k, gate_up, down, **consts) -> pattern.MatchResult:
        result = pattern.MatchResult()
        w1, w2 = gate_up.const_value, down.const_value
        if w1 is None or w2 is None or len(w1.shape) != 3 or len(w2.shape) != 3:
            return result.fail("expert weights are not constant [experts, out, in] tensors", gate_up)
        experts, two_inter, hidden = w1.shape
        if tuple(w2.shape) != (experts, hidden, two_inter // 2) or two_inter % 2:
            return result.fail(f"down {tuple(w2.shape)} does not fit gate_up {tuple(w1.shape)}", down)
        if {x.dtype, logits.dtype, w1.dtype, w2.dtype} != {ir.DataType.FLOAT}:
            return result.fail("not all fp32 (the MoE form this pass writes and probes is fp32)", x)
        if x.shape is None or x.shape.rank() != 2 or logits.shape is None or logits.shape.rank() != 2:
            return result.fail("tokens and router logits are not 2-D [tokens, features]", x)
        if logits.shape[1] != experts:
            return result.fail(f"router logits have {logits.shape[1]} columns for {experts} experts", logits)
        top_k = _ints(k)
        if top_k is None or len(top_k) != 1 or not 1 <= top_k[0] <= experts:
            return result.fail("TopK's k is not one constant between 1 and the number of experts", k)
        reason = _layout_mismatch(top_k[0], hidden, consts, self._normalized) or cpu_moe_refusal()
        return result.fail(reason, x) if reason else result

    def rewrite(self, op, x, logits, k, gate_up, down, **_):
        stacked = gate_up.const_value.numpy()
        experts, two_inter, hidden = stacked.shape
        # [gate rows; up rows] -> gate row i, up row i, gate row i+1, ... (swiglu_fusion=1)
        interleaved = stacked.reshape(experts, 2, two_inter // 2, hidden).transpose(0, 2, 1, 3)
        fc1 = op.initializer(ir.tensor(np.ascontiguousarray(interleaved).reshape(stacked.shape)),
                             name=f"{logits.name}.moe_fc1_interleaved")
        return op.MoE(x, logits, fc1, None, down, **moe_attributes(_ints(k)[0], self._normalized),
                      _domain="com.microsoft")


def moe_attributes(k: int, normalized: bool) -> dict:
    return dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                normalize_routing_weights=int(normalized))


@functools.lru_cache(maxsize=1)
def cpu_moe_refusal() -> str | None:
    """None when this onnxruntime's CPU provider runs the MoE node this pass writes, else why not in one line
    (older releases have no CPU MoE, or no interleaved SwiGLU): the block then stays unfused."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(np.ones(shape, np.float32), name)
               for name, shape in (("fc1", (2, 4, 2)), ("fc2", (2, 2, 2)))]
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft",
                            **moe_attributes(1, True))
    graph = helper.make_graph([node], "luffy_moe_probe", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((1, 2), np.float32), "logits": np.zeros((1, 2), np.float32)})
    except Exception as exc:  # noqa: BLE001 - ORT's refusal, whatever its type, is the answer
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return f"onnxruntime {ort.__version__} CPU cannot run MoE(swiglu, swiglu_fusion=1): {lines[0][:200] if lines else ''}"
    return None


def _layout_mismatch(top_k: int, hidden: int, consts: dict, normalized: bool) -> str | None:
    """Why the shape constants do not pair token t's j-th copy with its j-th expert (None: they do)."""
    expected = {
        "repeat_axes": {(1,)}, "repeat_shape": {(1, top_k, 1)}, "repeat_flat": {(-1, hidden)},
        "ids_flat": {_LAST}, "ids_axes": {_LAST, (1,)}, "col_axes": {_LAST, (2,)}, "row_axes": {_LAST, (2,)},
        "weight_flat": {_LAST}, "weight_axes": {_LAST, (1,)}, "out_shape": {(-1, top_k, hidden)},
        "out_axes": {(1,)},
    }
    if normalized:
        expected["sum_k_axes"] = {_LAST, (1,)}
    for name, allowed in expected.items():
        got = _ints(consts.get(name))
        if got not in allowed:
            return f"{name} is {got}, expected one of {sorted(allowed)}"
    return None


def fuse_moe() -> RulePass:
    rules = [TopKSwiGLUExperts.rule(normalized=True), TopKSwiGLUExperts.rule(normalized=False)]
    return RulePass(RewriteRuleSet(rules, commute=True))
