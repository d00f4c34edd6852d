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
- the token embedding (a Gather from a constant [vocab, hidden] table) as GatherBlockQuantized at ``bits``
  when ``quantize_embeddings``: it saves memory, not decode time (one row is read per token). A table the
  lm_head also reads (tied embeddings; the head multiplies by its transpose) is quantized once: MatMulNBits and
  GatherBlockQuantized read the same codes, scales and zero points, so nothing of vocab x hidden stays fp32
  and the table is stored once (at 1B, the fp32 tied head was 1.05 of the 1.6 GB an int4 token read).

The bytes are made by passes/weight_codes.py when the artifact is written, a slice of a weight at a time.

``layout="qdq"`` writes the same decisions in standard ONNX for TensorRT, whose strongly typed networks
take precision from the graph: DequantizeLinear (opset 21+) of constant codes feeding the unchanged
MatMul -- int4 blockwise along K and symmetric (TensorRT's int4 weight-only quantization takes no zero
point), int8 per output channel. Embeddings stay float there (TensorRT has no quantized gather).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import gptq as gptq_math
from .keep_last_logits import find_lm_head, transposed_constant
from .weight_codes import PackedWeight, column_reader, ort_nbits, ort_rtn, row_reader

MS = "com.microsoft"
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"  # what onnxscript's folder records on a folded initializer
EMBEDDINGS_KEPT = "kept fp32 (a gather reads one row per token: quantizing the table saves memory, not decode time)"


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
    # GPTQ: input name -> its Hessian (X^T X / tokens) or a callable giving it or its gptq.HessianFactor; a dict, or
    # anything with get() and truthiness (gptq.SharedFactors, the streamed compile's LayerHessians)
    hessians: dict = field(default_factory=dict, compare=False, repr=False)

    def describe(self) -> dict:
        if self.layout == "qdq":
            return {"layout": "qdq", "bits": self.bits, "block_size": self.block_size if self.bits == 4 else None,
                    "symmetric": True, "lm_head_bits": self.lm_head_bits, "embeddings": "kept",
                    "method": "gptq" if self.hessians else "rtn"}
        scheme = {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                  "accuracy_level": self.accuracy_level, "lm_head_bits": self.lm_head_bits,
                  "embeddings": f"int{self.bits} GatherBlockQuantized" if self.quantize_embeddings else EMBEDDINGS_KEPT,
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
        tied = None
        if self.spec.layout != "qdq" and self.spec.quantize_embeddings:
            tied = tied_embedding(graph, lm_head, self.spec.block_size)
        decisions, skipped = [], []
        for node in list(graph):
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                bits = self.spec.lm_head_bits if node is lm_head else self.spec.bits
                if tied is not None and node is lm_head and bits is not None:
                    decisions += self._quantize_tied(graph, node, tied, bits)
                    continue
                weight = node.inputs[1]
                if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2 or \
                        weight.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                    skipped.append({"node": node.name, "reason": "weight is not a constant 2-D float matrix"})
                    continue
                if bits is None:
                    decisions.append({"node": node.name, "role": "lm_head", "kept": "fp32"})
                    continue
                role = "lm_head" if node is lm_head else "body"
                quantize = self._quantize_matmul_qdq if self.spec.layout == "qdq" else self._quantize_matmul
                decisions.append(quantize(graph, node, bits, role))
            elif node.op_type == "Gather" and self.spec.quantize_embeddings and self.spec.layout != "qdq" \
                    and _is_embedding(node) and (tied is None or node is not tied[0]):
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

    def _packed(self, read, k: int, n: int, bits: int, hessian=None) -> PackedWeight:
        return PackedWeight(read, k, n, bits, self.spec.block_size, self.spec.symmetric, hessian,
                            clip_search=self.spec.clip_search)

    def _quantize_matmul(self, graph: ir.Graph, node: ir.Node, bits: int, role: str) -> dict:
        weight = node.inputs[1]
        k, n = weight.const_value.shape
        hessian = self.spec.hessians.get(node.inputs[0].name)
        packed = self._packed(column_reader(weight.const_value), k, n, bits, hessian)
        self._matmul_nbits(graph, node, packed, _tensors(graph, packed.tensors(weight.name or node.name)))
        record = {"node": node.name, "role": role, "op": "MatMulNBits", "bits": bits, "K": k, "N": n,
                  "method": packed.method}
        if hessian is not None and packed.method != "gptq":
            record["why_rtn"] = f"K={k} is not a multiple of block size {self.spec.block_size}"
        return record

    def _matmul_nbits(self, graph: ir.Graph, node: ir.Node, packed: PackedWeight, tensors: list[ir.Value]) -> None:
        fused = ir.node(
            "MatMulNBits", [node.inputs[0], *tensors], domain=MS, name=f"{node.name}_q{packed.bits}",
            attributes={"K": packed.k, "N": packed.n, "bits": packed.bits, "block_size": packed.block,
                        "accuracy_level": self.spec.accuracy_level},
        )
        _replace(graph, node, fused)

    def _quantize_tied(self, graph: ir.Graph, head: ir.Node, tied: tuple, bits: int) -> list[dict]:
        """One set of codes for a tied table: MatMulNBits reads them as the head, GatherBlockQuantized as the
        embedding, both straight from the [vocab, K/block, blob] initializer (the gather quantized along axis 2,
        its output reshaped to [..., hidden]). No node reshapes the codes: ONNX Runtime would fold such a Reshape
        into a heap copy of the table at load (131 MB at the 1B shape, int4), beside the head's prepacked copy."""
        gather, table = tied
        n, k = table.const_value.shape
        packed = self._packed(row_reader(table.const_value), k, n, bits, self.spec.hessians.get(head.inputs[0].name))
        tensors = _tensors(graph, packed.tensors(table.name))
        self._matmul_nbits(graph, head, packed, tensors)
        ids_rank = gather.inputs[1].shape.rank() if gather.inputs[1].shape is not None else None
        if ids_rank is None:
            raise ValueError(f"{gather.name}: the rank of its indices is unknown, so its output cannot be reshaped")
        scales_shape = _initializer(graph, f"{table.name}_gather_scales_shape",
                                    np.array([n, packed.blocks, 1], dtype=np.int64))
        scales = ir.node("Reshape", [tensors[1], scales_shape], name=f"{gather.name}_scales")
        scales.outputs[0].dtype, scales.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([n, packed.blocks, 1])
        graph.insert_before(gather, scales)
        inputs = [tensors[0], scales.outputs[0]]
        if not packed.symmetric:
            inputs += _tensors(graph, [packed.gather_zero_points(table.name)])
        self._gather_block_quantized(graph, gather, inputs, bits, quantize_axis=2, ids_rank=ids_rank, hidden=k)
        return [{"node": head.name, "role": "lm_head", "op": "MatMulNBits", "bits": bits, "K": k, "N": n,
                 "method": packed.method, "tied_to": gather.name},
                {"node": gather.name, "role": "embedding", "op": "GatherBlockQuantized", "bits": bits,
                 "shape": [n, k], "method": packed.method, "shares": "the lm_head's codes and scales"}]

    def _gather_block_quantized(self, graph: ir.Graph, gather: ir.Node, tensors: list[ir.Value], bits: int,
                                quantize_axis: int = 1, ids_rank: int = 0, hidden: int = 0) -> None:
        """Replace ``gather`` with GatherBlockQuantized over ``tensors`` (codes, scales[, zero points]). Codes of
        rank 3 ([vocab, K/block, blob], ``quantize_axis`` 2) give [..., K/block, block] rows, reshaped to
        [..., ``hidden``] (the ``ids_rank`` leading dimensions kept)."""
        fused = ir.node(
            "GatherBlockQuantized", [tensors[0], gather.inputs[1], *tensors[1:]], domain=MS, name=f"{gather.name}_q{bits}",
            attributes={"gather_axis": 0, "quantize_axis": quantize_axis, "block_size": self.spec.block_size,
                        "bits": bits},
        )
        if quantize_axis == 1:
            _replace(graph, gather, fused)
            return
        graph.insert_before(gather, fused)
        shape = _initializer(graph, f"{gather.name}_rows_shape", np.array([0] * ids_rank + [hidden], dtype=np.int64))
        rows = ir.node("Reshape", [fused.outputs[0], shape], name=f"{gather.name}_rows")
        _replace(graph, gather, rows)

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
        """An embedding table of its own: its rows quantized as MatMulNBits would, stored as [vocab, hidden*bits/8]."""
        table = node.inputs[0]
        n, k = table.const_value.shape
        bits = self.spec.bits
        if k % self.spec.block_size:
            return {"node": node.name, "role": "embedding", "kept": "fp32",
                    "why": f"hidden size {k} is not a multiple of block size {self.spec.block_size}"}
        packed = self._packed(row_reader(table.const_value), k, n, bits)
        tensors = _tensors(graph, packed.tensors(table.name, flat_codes=True))
        self._gather_block_quantized(graph, node, tensors, bits)
        return {"node": node.name, "role": "embedding", "op": "GatherBlockQuantized", "bits": bits, "shape": [n, k],
                "method": packed.method}


_ort_nbits, _ort_rtn = ort_nbits, ort_rtn  # the names quantize-moe, the kernels benchmark and the tests import


def tied_embedding(graph: ir.Graph, head: ir.Node | None, block_size: int) -> tuple[ir.Node, ir.Value] | None:
    """(the embedding Gather, its table) when the lm_head multiplies by that table's transpose: a Transpose node
    (a large tied table: the exporter folds a transpose only for a tensor read once) or the folded copy of one."""
    if head is None:
        return None
    weight = head.inputs[1]
    table = transposed_constant(weight)
    if table is None and weight.const_value is not None:
        sources = weight.metadata_props.get(FOLDED_FROM, "")
        candidate = next((v for v in graph.initializers.values() if sources == repr([v.name])), None)
        if candidate is not None and candidate.const_value is not None and \
                tuple(candidate.const_value.shape) == tuple(weight.const_value.shape)[::-1] and \
                np.array_equal(candidate.const_value.numpy(), weight.const_value.numpy().T):
            table = candidate
    if table is None or len(table.const_value.shape) != 2 or table.const_value.shape[1] % block_size:
        return None
    gathers = [node for node, index in table.uses() if index == 0 and node.op_type == "Gather" and _is_embedding(node)]
    return (gathers[0], table) if len(gathers) == 1 else None


def _tensors(graph: ir.Graph, tensors: list[ir.TensorProtocol]) -> list[ir.Value]:
    values = [_typed(t.name, t) for t in tensors]
    for value in values:
        graph.register_initializer(value)
    return values


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
