"""Top-k mixture-of-experts SwiGLU block -> one com.microsoft MoE.

luffy captures transformers' experts through their "batched_mm" path (compiler/capture/torch_export.py), which exports
per layer as: the routing (Softmax(router logits) -> TopK, then divided by the top-k sum or not; or TopK of
the logits -> Softmax over the k, which is the same division), every token repeated k times, each copy's
expert weights gathered out of the stacked [E, 2I, H] gate_up and [E, H, I] down tensors (GatherND: a copy
of k whole expert matrices per token), two batched MatMuls with silu(gate) * up between them, the k outputs
weighted and summed. ORT's MoE takes the router logits and the stacked weights as they are and runs only the
selected experts, without copying their weights.

The rule checks every constant that decides which rows meet which expert (the k of TopK and of the repeat,
the flatten and sum axes, the softmax and top-k axes), so a block routed any other way (sigmoid scores, a
correction bias before TopK, grouped experts) or with another activation is left alone. The op's CPU kernel
(ORT 1.32, moe_cpu.cc) accepts SwiGLU only with gate and up interleaved row by row (swiglu_fusion=1; "CPU
MoE only supports interleaved SwiGLU format"), so fc1 is gate_up with its rows interleaved at compile time;
activation_alpha=1, activation_beta=0 and no swiglu_limit make the op's SwiGLU silu(gate) * up exactly. ORT
applies the softmax and top-k itself, from the same logits. Whether the installed onnxruntime's CPU provider
runs that node is asked of it once (a one-node probe session); where it does not, every block stays unfused
and the report says why.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxscript.rewriter import RewriteRuleSet, pattern

from ..runtimes.ort_compat import session_options
from .rule_pass import RulePass

_LAST = (-1,)


def _ints(value: ir.Value | None) -> tuple[int, ...] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tuple(int(v) for v in tensor.numpy().reshape(-1))


# How a block turns router logits into top-k weights. ORT's MoE takes the logits and computes softmax, top-k
# and (normalize_routing_weights=1) the division by the top-k sum itself; a softmax over the top-k logits
# (Granite-MoE) is that same division, exp(l_j) / sum over the top k of exp(l_i).
RENORMALIZED, SOFTMAX_WEIGHTS, SOFTMAX_OF_TOP_K = "renormalized", "softmax", "softmax_of_top_k"
ROUTINGS = {RENORMALIZED: 1, SOFTMAX_WEIGHTS: 0, SOFTMAX_OF_TOP_K: 1}  # routing -> normalize_routing_weights


class TopKSwiGLUExperts(pattern.RewriteRuleClassBase):
    """out[t] = sum_j w[t, j] * down[e_j] @ (silu(gate[e_j] @ x[t]) * up[e_j] @ x[t]), (w, e) = top-k routing."""

    def __init__(self, routing: str):
        super().__init__(name=f"MoE_{routing}")
        self._routing = routing

    def _route(self, op, logits, k, sum_k_axes):
        if self._routing == SOFTMAX_OF_TOP_K:
            top_logits, ids = op.TopK(logits, k, largest=1, _outputs=["top", "ids"])
            return op.Softmax(top_logits, _outputs=["probs"]), ids
        weights, ids = op.TopK(op.Softmax(logits, _outputs=["probs"]), k, largest=1, _outputs=["top", "ids"])
        if self._routing == RENORMALIZED:
            weights = op.Div(weights, op.ReduceSum(weights, sum_k_axes, keepdims=1))
        return weights, ids

    def pattern(self, op, x, logits, k, gate_up, down, sum_k_axes, repeat_axes, repeat_shape, repeat_flat,
                ids_flat, ids_axes, col_axes, row_axes, weight_flat, weight_axes, out_shape, out_axes):
        weights, ids = self._route(op, logits, k, sum_k_axes)
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
        reason = (_not_last_axis(consts["probs"], consts["top"]) or
                  _layout_mismatch(top_k[0], hidden, consts, self._routing == RENORMALIZED) or cpu_moe_refusal())
        return result.fail(reason, x) if reason else result

    def rewrite(self, op, x, logits, k, gate_up, down, **_):
        stacked = gate_up.const_value.numpy()
        experts, two_inter, hidden = stacked.shape
        # [gate rows; up rows] -> gate row i, up row i, gate row i+1, ... (swiglu_fusion=1)
        interleaved = stacked.reshape(experts, 2, two_inter // 2, hidden).transpose(0, 2, 1, 3)
        fc1 = op.initializer(ir.tensor(np.ascontiguousarray(interleaved).reshape(stacked.shape)),
                             name=f"{logits.name}.moe_fc1_interleaved")
        return op.MoE(x, logits, fc1, None, down, **moe_attributes(_ints(k)[0], ROUTINGS[self._routing]),
                      _domain="com.microsoft")


def moe_attributes(k: int, normalized: int) -> dict:
    return dict(k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                normalize_routing_weights=int(normalized))


@functools.lru_cache(maxsize=1)
def cpu_moe_refusal() -> str | None:
    """None when this onnxruntime's CPU provider runs the MoE node this pass writes, else why not in one line
    (older releases have no CPU MoE, or no interleaved SwiGLU): the block then stays unfused."""
    weights = [numpy_helper.from_array(np.ones(shape, np.float32), name)
               for name, shape in (("fc1", (2, 4, 2)), ("fc2", (2, 2, 2)))]
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft",
                            **moe_attributes(1, True))
    graph = helper.make_graph([node], "luffy_moe_probe", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], weights)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = session_options()  # a plain SessionOptions is refused once the process shares one thread pool
    options.log_severity_level = 4  # a refusal is an answer here, not an error to log
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((1, 2), np.float32), "logits": np.zeros((1, 2), np.float32)})
    except Exception as exc:  # noqa: BLE001 - ORT's refusal, whatever its type, is the answer
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # "[ONNXRuntimeError] : 1 : FAIL : ... moe_cpu.cc:28 ... [with T = float] CPU MoE only supports ...": the end
        why = lines[0].rsplit("] ", 1)[-1].strip(" :")[:200] if lines else type(exc).__name__
        return f"onnxruntime {ort.__version__} CPU cannot run MoE(swiglu, swiglu_fusion=1): {why}"
    return None


def _not_last_axis(*values: ir.Value) -> str | None:
    """Softmax and TopK must work along the experts axis: -1, or 1 of a 2-D input (Hunyuan writes dim=1)."""
    for value in values:
        node = value.producer()
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else -1  # both ops' default (opset 13+)
        rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
        if axis != -1 and not (rank is not None and axis == rank - 1):
            return f"{node.op_type} {node.name} works along axis {axis}, not the experts axis"
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


# Built once per process: commuting a rule set copies every pattern per operand order (most of a small
# graph's compile time), and the rules hold no state between applications; each compile gets a fresh RulePass.
@functools.cache
def _moe_rules() -> RewriteRuleSet:
    return RewriteRuleSet([TopKSwiGLUExperts.rule(routing=routing) for routing in ROUTINGS], commute=True)


def fuse_moe() -> RulePass:
    return RulePass(_moe_rules())
