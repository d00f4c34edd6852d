"""quantize-moe: com.microsoft MoE with fp32 experts -> QMoE with blockwise int4/int8 experts.

The int4/int8 precisions quantize every MatMul (quantize-weights), but the experts of a fused MoE are no
MatMul: they are the op's stacked [experts, out, in] inputs, and in a mixture-of-experts model they are
most of the weights. ORT's QMoE reads them quantized the way MatMulNBits does, per expert: with
weights_prepacked=0 it takes "raw [E, N, K/pack] tensors as produced by quantize_matmul_{4,8}bits", so
each expert matrix goes through the same ORT packer as a MatMul weight (round to nearest, the spec's block
size and symmetry) and the results are stacked. Routing, SwiGLU layout and k are the MoE node's own.

GPTQ (--calib) calibrates MatMul inputs; expert inputs are not collected, so experts are always round to
nearest, and the decision says so. A node whose hidden or intermediate size is not a multiple of the
block size (QMoE's requirement), or that has biases or a separate fc3, keeps fp32 experts, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .quantize_weights import MS, WeightQuantization, _initializer, _ort_rtn, _replace

FC1, FC1_BIAS, FC2, FC2_BIAS = 2, 3, 4, 5  # MoE input positions


class QuantizeMoE(ir.passes.InPlacePass):
    def __init__(self, spec: WeightQuantization):
        super().__init__()
        self.spec = spec
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        decisions = [self._quantize(model.graph, node) for node in list(model.graph)
                     if node.op_type == "MoE" and node.domain == MS]
        quantized = [d for d in decisions if "kept" not in d]
        self.stats = {"matches": len(quantized), "decisions": decisions}
        if not decisions:
            self.stats["not_matched"] = [{"rule": "QMoE", "reason": "graph has no com.microsoft MoE node"}]
        return ir.passes.PassResult(model, modified=bool(quantized))

    def _quantize(self, graph: ir.Graph, node: ir.Node) -> dict:
        reason = _refusal(node, self.spec.block_size)
        if reason:
            return {"node": node.name, "kept": "fp32", "reason": reason}
        bits, block = self.spec.bits, self.spec.block_size
        experts, _, hidden = node.inputs[FC1].const_value.shape
        fc1, fc1_scales, fc1_zeros = self._pack(node.inputs[FC1].const_value.numpy())
        fc2, fc2_scales, fc2_zeros = self._pack(node.inputs[FC2].const_value.numpy())
        base = node.name or node.outputs[0].name

        def weight(suffix: str, array: np.ndarray | None) -> ir.Value | None:
            return None if array is None else _initializer(graph, f"{base}_{suffix}", array)

        # QMoE's inputs: x, router logits, fc1 codes/scales/bias, fc2 codes/scales/bias, fc3 codes/scales/bias,
        # fc1/fc2 zero points.
        inputs = [node.inputs[0], node.inputs[1], weight(f"fc1_q{bits}", fc1), weight("fc1_scales", fc1_scales), None,
                  weight(f"fc2_q{bits}", fc2), weight("fc2_scales", fc2_scales), None, None, None, None,
                  weight("fc1_zero_points", fc1_zeros), weight("fc2_zero_points", fc2_zeros)]
        attributes = {**{k: a.value for k, a in node.attributes.items()}, "expert_weight_bits": bits,
                      "block_size": block, "accuracy_level": self.spec.accuracy_level, "weights_prepacked": 0}
        _replace(graph, node, ir.node("QMoE", inputs, domain=MS, name=f"{node.name}_q{bits}", attributes=attributes))
        return {"node": node.name, "op": "QMoE", "bits": bits, "block_size": block, "experts": experts,
                "hidden": hidden, "method": "rtn",
                **({"why_rtn": "GPTQ calibrates MatMul inputs; expert inputs are not collected"}
                   if self.spec.hessians else {})}

    def _pack(self, stacked: np.ndarray):
        """[E, N, K] expert weights -> codes [E, N, K*bits/8], scales [E, N, K/block], zero points or None."""
        experts, n, _ = stacked.shape
        # The packer quantizes a MatMul weight [K, N] along K: an expert's [N, K] matrix transposed.
        packed = [_ort_rtn(np.ascontiguousarray(w.T, dtype=np.float32), self.spec.bits, self.spec.block_size,
                           self.spec.symmetric) for w in stacked]
        codes = np.stack([p.reshape(n, -1) for p, _, _ in packed])
        scales = np.stack([s.reshape(n, -1) for _, s, _ in packed]).astype(np.float32)
        zeros = None if self.spec.symmetric else np.stack([z.reshape(n, -1) for _, _, z in packed])
        return codes, scales, zeros


def _refusal(node: ir.Node, block: int) -> str | None:
    inputs = list(node.inputs)
    if any(v is not None for v in inputs[FC1_BIAS:FC1_BIAS + 1] + inputs[FC2_BIAS:]):
        return "expert biases or a separate fc3: not the form quantize-moe writes"
    weights = [inputs[FC1], inputs[FC2]]
    if any(w is None or w.const_value is None or w.dtype != ir.DataType.FLOAT for w in weights):
        return "expert weights are not constant fp32 tensors"
    hidden, inter = weights[0].const_value.shape[2], weights[1].const_value.shape[2]
    if hidden % block or inter % block:
        return f"hidden size {hidden} and intermediate size {inter} must be multiples of the block size {block}"
    return None


def quantize_moe(spec: WeightQuantization) -> QuantizeMoE:
    return QuantizeMoE(spec)
