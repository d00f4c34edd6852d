"""convert-bf16: weights and activations to bfloat16, with the same fp32 islands as convert-fp16.

bfloat16 has fp32's exponent range, so it does not overflow where fp16 does; it has 8 mantissa bits
instead of fp16's 11, so precision is what it loses. The places fp16 keeps in fp32 (norm reductions,
softmax, exp/log, every float input and output but the KV cache) are exactly where that precision
matters, so this pass reuses convert-fp16's decisions and relabels the half type: one rule set for both
16-bit modes, and onnxruntime's converter still inserts the boundary Casts.

ONNX Runtime's CPU provider has no bfloat16 kernels for MatMul, Add, Softmax and the rest; the artifact
is meant for GPU providers and TensorRT. luffy checks it on CPU through runtimes/cpu_bf16.py, which
computes each op in fp32 and rounds every bf16 value to bf16, as bf16 GPU kernels accumulate in fp32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from .convert_fp16 import ConvertFloat16

HALF, BF16 = ir.DataType.FLOAT16, ir.DataType.BFLOAT16


class ConvertBfloat16(ir.passes.FunctionalPass):
    def __init__(self):
        super().__init__()
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        originals = {v.name: v.const_value for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT}
        fp16 = ConvertFloat16()
        half = fp16(model).model
        relabelled = relabel_half_as_bf16(half, originals)
        self.stats = {**fp16.stats, "values_relabelled": relabelled}
        return ir.passes.PassResult(half, modified=True)


def relabel_half_as_bf16(model: ir.Model, originals: dict[str, ir.TensorProtocol] | None = None) -> int:
    """Turn every float16 initializer, value, Cast target and tensor attribute into bfloat16, in place.

    ``originals`` maps initializer names to their fp32 tensors: bf16 is rounded from those, not from the
    fp16 copy, which would flush weights below fp16's 6e-5 and round twice.
    """
    graph = model.graph
    originals = originals or {}
    count = 0
    for value in graph.initializers.values():
        if value.dtype == HALF:
            value.const_value = _to_bf16(originals.get(value.name, value.const_value), value.name)
    values = [*graph.inputs, *graph.initializers.values()] + [o for node in graph for o in node.outputs]
    for value in values:
        if value.dtype == HALF:
            value.dtype = BF16
            count += 1
    for node in graph:
        for name, attr in node.attributes.items():
            if node.op_type == "Cast" and name == "to" and attr.value == HALF:
                node.attributes["to"] = ir.AttrInt64("to", BF16)
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == HALF:
                node.attributes[name] = ir.AttrTensor(name, _to_bf16(attr.value, attr.value.name))
    return count


def _to_bf16(tensor: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    # Clipped to bf16's finite range, as ORT's converter clips to fp16's: masks use finfo(float32).min,
    # which rounds to -inf in bf16, and -inf in a fully masked row turns softmax into NaN.
    finite = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    values = np.clip(np.asarray(tensor.numpy(), np.float32), -finite, finite)
    return ir.tensor(values.astype(ml_dtypes.bfloat16), name=name)


def convert_bf16() -> ConvertBfloat16:
    return ConvertBfloat16()
