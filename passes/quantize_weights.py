"""quantize-weights: blockwise weight-only int4/int8 -- MatMul -> MatMulNBits, embedding -> GatherBlockQuantized.

Decode on a CPU reads every weight once per token, so weight bytes are decode time; activations stay
fp32. Round-to-nearest codes come from ONNX Runtime's own packer (`DefaultWeightOnlyQuantizer`, the
MatMulNBitsQuantizer's engine); calibrated codes come from luffy's GPTQ (passes/gptq.py) when the
compiler hands this pass the Hessians of the MatMul inputs. luffy's part is the decisions, recorded per
node in ``stats["decisions"]``:

- every MatMul with a constant 2-D float weight is quantized at ``bits``;
- the lm_head at ``lm_head_bits`` (8 when the body is 4: the logits feed sampling directly, and the
  head is a single matrix, so its extra bytes are few next to the quality they keep), or kept at fp32
  when ``lm_head_bits`` is None;
- the token embedding (a Gather from a constant [vocab, hidden] table) as 4-bit GatherBlockQuantized when
  ``quantize_embeddings``: it saves memory, not decode time (one row is read per token), so it is only
  done where ORT has the 4-bit kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import gptq as gptq_math
from .keep_last_logits import find_lm_head

MS = "com.microsoft"


@dataclass(frozen=True)
class WeightQuantization:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    # MatMulNBits accuracy_level 4: activations quantized to int8 per block inside the kernel, so the inner
    # product runs on int8 dot-product instructions. It is what makes int4 decode fast on x86/ARM CPUs.
    accuracy_level: int = 4
    lm_head_bits: int | None = 8
    quantize_embeddings: bool = False
    hessians: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level, "lm_head_bits": self.lm_head_bits,
                "embeddings": "int4 GatherBlockQuantized" if self.quantize_embeddings else "kept",
                "method": "gptq" if self.hessians else "rtn"}


class QuantizeWeights(ir.passes.InPlacePass):
    def __init__(self, spec: WeightQuantization):
        super().__init__()
        self.spec = spec
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lm_head, _ = find_lm_head(graph, allow_kept=True)
        decisions, skipped = [], []
        for node in list(graph):
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                weight = node.inputs[1]
                if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2 or \
                        weight.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                    skipped.append({"node": node.name, "reason": "weight is not a constant 2-D float matrix"})
                    continue
                bits = self.spec.lm_head_bits if node is lm_head else self.spec.bits
                if bits is None:
                    decisions.append({"node": node.name, "role": "lm_head", "kept": "fp32"})
                    continue
                decisions.append(self._quantize_matmul(graph, node, bits, "lm_head" if node is lm_head else "body"))
            elif node.op_type == "Gather" and self.spec.quantize_embeddings and _is_embedding(node):
                decisions.append(self._quantize_embedding(graph, node))
        quantized = [d for d in decisions if "kept" not in d]
        if quantized:
            model.opset_imports.setdefault(MS, 1)
        self.stats = {
            "matches": len(quantized), "scheme": self.spec.describe(), "decisions": decisions,
            "not_matched": skipped,
        }
        return ir.passes.PassResult(model, modified=bool(quantized))

    def _quantize_matmul(self, graph: ir.Graph, node: ir.Node, bits: int, role: str) -> dict:
        spec = self.spec
        weight = node.inputs[1]
        w = np.ascontiguousarray(weight.const_value.numpy(), dtype=np.float32)  # the C++ packer reads raw memory
        k, n = w.shape
        hessian = self.spec.hessians.get(node.inputs[0].name)
        method = "rtn"
        if hessian is not None and k % spec.block_size == 0:
            codes, scales, zeros = gptq_math.gptq(w, hessian, bits, spec.block_size, spec.symmetric)
            packed, scales, zero_points = gptq_math.pack_matmul_nbits(codes, scales, zeros, bits, spec.block_size,
                                                                      spec.symmetric)
            method = "gptq"
        else:
            packed, scales, zero_points = _ort_rtn(w, bits, spec.block_size, spec.symmetric)
        base = weight.name or node.name
        inputs = [node.inputs[0], _initializer(graph, f"{base}_q{bits}", packed),
                  _initializer(graph, f"{base}_scales", scales.reshape(n, -1))]
        if zero_points is not None:
            inputs.append(_initializer(graph, f"{base}_zero_points", zero_points.reshape(n, -1)))
        fused = ir.node(
            "MatMulNBits", inputs, domain=MS, name=f"{node.name}_q{bits}",
            attributes={"K": k, "N": n, "bits": bits, "block_size": spec.block_size,
                        "accuracy_level": spec.accuracy_level},
        )
        _replace(graph, node, fused)
        record = {"node": node.name, "role": role, "op": "MatMulNBits", "bits": bits, "K": k, "N": n, "method": method}
        if hessian is not None and method == "rtn":
            record["why_rtn"] = f"K={k} is not a multiple of block size {spec.block_size}"
        return record

    def _quantize_embedding(self, graph: ir.Graph, node: ir.Node) -> dict:
        DefaultWeightOnlyQuantizer = _ort_nbits().DefaultWeightOnlyQuantizer  # noqa: N806

        table = node.inputs[0]
        data = np.ascontiguousarray(table.const_value.numpy(), dtype=np.float32)
        block = self.spec.block_size
        with np.errstate(invalid="ignore", divide="ignore"):  # all-zero rows (the padding token): ORT maps them to 0
            packed, scales, zero_points = DefaultWeightOnlyQuantizer.quantize_ndarray(data, 1, block, self.spec.symmetric)
        qtype = ir.DataType.INT4 if self.spec.symmetric else ir.DataType.UINT4
        quantized = ir.Value(name=f"{table.name}_q4", const_value=ir.Tensor(_unpack4(packed, data.shape), dtype=qtype))
        graph.register_initializer(quantized)
        inputs = [quantized, node.inputs[1], _initializer(graph, f"{table.name}_scales", scales)]
        if zero_points is not None:
            zp = ir.Value(name=f"{table.name}_zero_points",
                          const_value=ir.Tensor(_unpack4(zero_points, scales.shape), dtype=qtype))
            graph.register_initializer(zp)
            inputs.append(zp)
        fused = ir.node(
            "GatherBlockQuantized", inputs, domain=MS, name=f"{node.name}_q4",
            attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 4},
        )
        _replace(graph, node, fused)
        return {"node": node.name, "role": "embedding", "op": "GatherBlockQuantized", "bits": 4,
                "shape": list(data.shape), "method": "rtn"}


def _ort_nbits():
    """onnxruntime's matmul_nbits_quantizer module, imported without its side effect.

    Importing it calls logging.basicConfig(level=INFO) on the root logger, which would turn on INFO
    logging for the whole process of whoever called luffy.compile. The root logger is put back as it was.
    """
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
    return matmul_nbits_quantizer


def _ort_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    nbits = _ort_nbits()
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    packed, scales, zero_points = nbits.DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)
    return packed, scales, None if symmetric else zero_points


def _unpack4(packed: np.ndarray, shape) -> np.ndarray:
    # onnx_ir wants one code per element for 4-bit tensors; it packs them again when saving.
    flat = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)
    return flat[: int(np.prod(shape))].reshape(shape).astype(np.uint8)


def _is_embedding(node: ir.Node) -> bool:
    table = node.inputs[0]
    axis = node.attributes.get("axis")
    return (table is not None and table.const_value is not None and len(table.const_value.shape) == 2
            and (axis is None or axis.as_int() == 0) and table.dtype == ir.DataType.FLOAT)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array)))
    graph.register_initializer(value)
    return value


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    new.outputs[0].name, new.outputs[0].shape, new.outputs[0].dtype = None, old.outputs[0].shape, old.outputs[0].dtype
    ir.convenience.replace_nodes_and_values(graph, old, [old], [new], old.outputs, new.outputs)


def quantize_weights(spec: WeightQuantization) -> QuantizeWeights:
    return QuantizeWeights(spec)
