"""quantize-dynamic-int8: int8 weights per output channel, activations quantized to int8 at run time.

onnxruntime's `quantize_dynamic` does it (MatMul -> DynamicQuantizeLinear + MatMulInteger, which ORT's
session optimizer fuses into DynamicQuantizeMatMul). luffy chooses the nodes: MatMuls with a constant
2-D weight, the lm_head included; attention, norms and everything else stay fp32. Unlike the
weight-only modes, no block scales are needed, and the product runs on int8 instructions.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from onnxruntime.quantization import QuantType, quantize_dynamic


class QuantizeDynamicInt8(ir.passes.FunctionalPass):
    """``reduce_range`` quantizes weights to 7 bits, which CPUs whose int8 kernels saturate need (the
    compiler decides, from the CPU; see runtimes/cpu_features.py)."""

    def __init__(self, reduce_range: bool = True):
        super().__init__()
        self.reduce_range = reduce_range
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chosen = [n.name for n in model.graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
                  and n.inputs[1] is not None and n.inputs[1].const_value is not None
                  and len(n.inputs[1].const_value.shape) == 2]
        if not chosen:
            self.stats = {"matches": 0, "not_matched": [{"rule": "quantize-dynamic-int8",
                                                          "reason": "no MatMul with a constant 2-D weight"}]}
            return ir.passes.PassResult(model.clone(), modified=False)  # a functional pass returns a new model
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger to "run pre-processing"
        try:
            new = _quantize(model, chosen, self.reduce_range)
        finally:
            root.setLevel(level)
        self.stats = {
            "matches": sum(1 for n in new.graph if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")),
            "scheme": {"weights": f"int{7 if self.reduce_range else 8} per output channel, symmetric",
                       "activations": "uint8 per tensor, at run time", "reduce_range": self.reduce_range},
            "nodes": chosen,
        }
        return ir.passes.PassResult(new, modified=True)


def _quantize(model: ir.Model, chosen: list[str], reduce_range: bool) -> ir.Model:
    with tempfile.TemporaryDirectory(prefix="luffy-dq-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        ir.save(model, src, external_data="in.onnx.data")
        quantize_dynamic(
            src, dst, op_types_to_quantize=["MatMul"], nodes_to_quantize=chosen, per_channel=True,
            weight_type=QuantType.QInt8, use_external_data_format=True, extra_options={"MatMulConstBOnly": True},
            reduce_range=reduce_range,
        )
        return ir.serde.deserialize_model(onnx.load(dst))


def quantize_dynamic_int8(reduce_range: bool = True) -> QuantizeDynamicInt8:
    return QuantizeDynamicInt8(reduce_range)
