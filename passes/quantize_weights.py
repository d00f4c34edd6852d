"""quantize-weights: blockwise weight-only int4/int8 -- MatMul -> MatMulNBits, embedding -> GatherBlockQuantized.

Decode on a CPU reads every weight once per token, so weight bytes are decode time; activations stay
fp32. Round-to-nearest codes come from ONNX Runtime's own packer (`DefaultWeightOnlyQuantizer`, the
MatMulNBitsQuantizer's engine); calibrated codes come from luffy's GPTQ (passes/gptq.py) when the
compiler hands this pass the Hessians of the MatMul inputs. luffy's part is the decisions, recorded per
node in ``stats["decisions"]``:

- every MatMul with a constant 2-D float weight is quantized at ``bits``;
- the lm_head at ``lm_head_bits``, or kept at fp32 when it is None. The compiler quantizes it like the
  body: on a 32k vocabulary it is a fifth of a 156M model's weights, and at 8 bits it was a third of
  the bytes an int4 decode step streams (measured: +5-15% decode tok/s at 4 bits, for +0.06% held-out
  perplexity on llama-pydoc);
- the token embedding (a Gather from a constant [vocab, hidden] table) as 4-bit GatherBlockQuantized when
  ``quantize_embeddings``: it saves memory, not decode time (one row is read per token), so it is only
  done where ORT has the 4-bit kernel.

``layout="qdq"`` writes the same decisions in standard ONNX for TensorRT, whose strongly typed networks
take precision from the graph: DequantizeLinear (opset 21+) of constant codes feeding the unchanged
MatMul -- int4 blockwise along K and symmetric (TensorRT's int4 weight-only quantization takes no zero
point), int8 per output channel. Embeddings stay float there (TensorRT has no quantized gather).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import gptq as gptq_math
from .keep_last_logits import find_lm_head

MS = "com.microsoft"
EMBEDDINGS_KEPT = ("kept fp32: ORT's GatherBlockQuantized path is 4-bit, and a gather reads one row per token, "
                   "so quantizing the table saves memory, not decode time")


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
    layout: str = "matmulnbits"  # or "qdq": DequantizeLinear + MatMul in standard ONNX (the TensorRT target)
    # round-to-nearest with each block's range clipped for the least squared error (gptq.clipped_rtn) instead
    # of ORT's packer; what the compiler asks for int4 without --calib
    clip_search: bool = False
    chosen_for: dict | None = None  # the CPU the block size / accuracy level were chosen for, and why
    hessians: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> dict:
        if self.layout == "qdq":
            return {"layout": "qdq", "bits": self.bits, "block_size": self.block_size if self.bits == 4 else None,
                    "symmetric": True, "lm_head_bits": self.lm_head_bits, "embeddings": "kept",
                    "method": "gptq" if self.hessians else "rtn"}
        scheme = {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                  "accuracy_level": self.accuracy_level, "lm_head_bits": self.lm_head_bits,
                  "embeddings": "int4 GatherBlockQuantized" if self.quantize_embeddings else EMBEDDINGS_KEPT,
                  "method": "gptq" if self.hessians else "rtn-clipped" if self.clip_search else "rtn"}
        return {**scheme, "chosen_for": self.chosen_for} if self.chosen_for else scheme


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
                role = "lm_head" if node is lm_head else "body"
                quantize = self._quantize_matmul_qdq if self.spec.layout == "qdq" else self._quantize_matmul
                decisions.append(quantize(graph, node, bits, role))
            elif node.op_type == "Gather" and self.spec.quantize_embeddings and self.spec.layout != "qdq" \
                    and _is_embedding(node):
                decisions.append(self._quantize_embedding(graph, node))
        quantized = [d for d in decisions if "kept" not in d]
        if quantized and self.spec.layout != "qdq":
            model.opset_imports.setdefault(MS, 1)
        if quantized and self.spec.layout == "qdq" and model.opset_imports.get("", 0) < 21:
            raise ValueError(f"qdq weights need opset >= 21 (blockwise DequantizeLinear); graph is {model.opset_imports['']}")
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
        elif spec.clip_search:
            codes, scales, zeros = gptq_math.clipped_rtn(w, bits, spec.block_size, spec.symmetric)
            packed, scales, zero_points = gptq_math.pack_matmul_nbits(codes, scales, zeros, bits, spec.block_size,
                                                                      spec.symmetric)
            method = "rtn-clipped"
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

    def _quantize_matmul_qdq(self, graph: ir.Graph, node: ir.Node, bits: int, role: str) -> dict:
        weight = node.inputs[1]
        w = np.ascontiguousarray(weight.const_value.numpy(), dtype=np.float32)
        k, n = w.shape
        block = self.spec.block_size if bits == 4 else k  # int8: one scale per output channel
        hessian = self.spec.hessians.get(node.inputs[0].name)
        if hessian is not None and bits == 4 and k % block == 0:
            codes, scales, _ = gptq_math.gptq(w, hessian, bits, block, True)
            method = "gptq"
        else:
            codes, scales, _ = gptq_math.rtn(w, bits, block, True)
            method = "rtn"
        signed = (codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8).T  # [K, N], centred on zero
        base = weight.name or node.name
        codes_value = _typed(f"{base}_q{bits}", ir.Tensor(np.ascontiguousarray(signed),
                                                            dtype=ir.DataType.INT4 if bits == 4 else ir.DataType.INT8))
        graph.register_initializer(codes_value)
        if bits == 4:
            scale = _initializer(graph, f"{base}_scales", scales.T.astype(np.float32))  # [K/block, N]
            attributes = {"axis": 0, "block_size": block}
        else:
            scale = _initializer(graph, f"{base}_scales", scales[:, 0].astype(np.float32))  # [N]
            attributes = {"axis": 1}
        dequant = ir.node("DequantizeLinear", [codes_value, scale], attributes=attributes, name=f"{node.name}_dq")
        dequant.outputs[0].dtype, dequant.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([k, n])
        graph.insert_before(node, dequant)
        node.replace_input_with(1, dequant.outputs[0])
        return {"node": node.name, "role": role, "op": "DequantizeLinear+MatMul", "bits": bits, "K": k, "N": n,
                "method": method, "granularity": f"block {block} along K" if bits == 4 else "per output channel"}

    def _quantize_embedding(self, graph: ir.Graph, node: ir.Node) -> dict:
        DefaultWeightOnlyQuantizer = _ort_nbits().DefaultWeightOnlyQuantizer  # noqa: N806

        table = node.inputs[0]
        data = np.ascontiguousarray(table.const_value.numpy(), dtype=np.float32)
        block = self.spec.block_size
        with np.errstate(invalid="ignore", divide="ignore"):  # all-zero rows (the padding token): ORT maps them to 0
            packed, scales, zero_points = DefaultWeightOnlyQuantizer.quantize_ndarray(data, 1, block, self.spec.symmetric)
        qtype = ir.DataType.INT4 if self.spec.symmetric else ir.DataType.UINT4
        quantized = _typed(f"{table.name}_q4", ir.Tensor(_unpack4(packed, data.shape), dtype=qtype))
        graph.register_initializer(quantized)
        inputs = [quantized, node.inputs[1], _initializer(graph, f"{table.name}_scales", scales)]
        if zero_points is not None:
            zp = _typed(f"{table.name}_zero_points", ir.Tensor(_unpack4(zero_points, scales.shape), dtype=qtype))
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
    tensor = ir.tensor(np.ascontiguousarray(array))
    value = ir.Value(name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _typed(name: str, tensor: ir.Tensor) -> ir.Value:
    return ir.Value(name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype))


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    new.outputs[0].name, new.outputs[0].shape, new.outputs[0].dtype = None, old.outputs[0].shape, old.outputs[0].dtype
    ir.convenience.replace_nodes_and_values(graph, old, [old], [new], old.outputs, new.outputs)


def quantize_weights(spec: WeightQuantization) -> QuantizeWeights:
    return QuantizeWeights(spec)
