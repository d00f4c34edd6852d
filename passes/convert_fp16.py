"""convert-fp16: weights and activations to float16, with fp32 kept where fp16 overflows or loses precision.

onnxruntime's float16 converter does the conversion (it already knows which ops and inputs must stay
float and inserts the Casts at the boundaries); luffy chooses what to keep in fp32:

- reductions of unfused norms and softmax (`FP32_OPS`): a sum of squares of a 4k-wide row overflows fp16
  (max 65504) long before the values themselves do, and exp() does at 11.1. The fused norm and attention
  kernels (Skip/SimplifiedLayerNormalization, LayerNormalization, GroupQueryAttention,
  MultiHeadAttention) accumulate in fp32 internally in ORT, so they run in fp16 at their boundaries;
- every float graph input and output but the KV cache (logits, hidden states, pooled embeddings):
  sampling, perplexity and similarity read them, and one Cast at the boundary is cheap.

The KV cache is fp16 (past and present are the same buffer under GQA's shared-buffer mode, so they must
have one type); the runtime reads the cache type from the graph. On the CPU, ORT runs fp16 nodes that lack
an fp16 kernel through inserted casts, so these artifacts are checked on CPU and meant for GPU providers.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

FP32_OPS = ("Pow", "ReduceMean", "ReduceSum", "ReduceSumSquare", "Sqrt", "Reciprocal", "Softmax", "LogSoftmax",
            "Exp", "Log", "CumSum", "Range")
KV_PREFIXES = ("past_key_values.", "present.")  # the cache is fp16; every other float input/output stays fp32


class ConvertFloat16(ir.passes.FunctionalPass):
    def __init__(self):
        super().__init__()
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        proto = ir.serde.serialize_model(model)
        floats_before = _float_initializers(model)
        kept_io = [v.name for v in (*model.graph.inputs, *model.graph.outputs)
                   if v.dtype == ir.DataType.FLOAT and not v.name.startswith(KV_PREFIXES)]
        converted = convert_float_to_float16(
            proto, keep_io_types=kept_io, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS),
            disable_shape_infer=False,
        )
        new = ir.serde.deserialize_model(converted)
        kept_nodes = sorted({n.op_type for n in new.graph if n.op_type in FP32_OPS})
        self.stats = {
            "matches": floats_before,
            "fp32_ops_kept": kept_nodes,
            "fp32_io_kept": kept_io,
            "casts_inserted": sum(1 for n in new.graph if n.op_type == "Cast") - sum(1 for n in model.graph if n.op_type == "Cast"),
        }
        return ir.passes.PassResult(new, modified=True)


def _float_initializers(model: ir.Model) -> int:
    return sum(1 for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT)


def convert_fp16() -> ConvertFloat16:
    return ConvertFloat16()
