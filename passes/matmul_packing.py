"""Sibling MatMuls with constant weights -> one MatMul over the weights concatenated along N.

Shared by pack-qkv and pack-gate-up. The weight transformation is a concatenation of the [K, N_i] MatMul
weights along axis 1 (torch: ``torch.cat([w_0, w_1, ...], dim=0).T`` of the Linear weights [N_i, K]), and
of their biases along axis 0. Block quantization runs along K per output column, so quantizing the packed
weight afterwards gives exactly the concatenation of the separately quantized ones (RTN and GPTQ alike:
the MatMuls share their input, hence their Hessian).

The packed tensor is an ``ir.LazyTensor`` over the originals: nothing is concatenated until something
reads it (the quantizer, the writer), so a compile that streams its weights (a layer template stamped
across the depth) replays the same concatenation per layer from the tensors it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

FLOAT_WEIGHTS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class Projection:
    """``x @ weight (+ bias)``: the MatMul, its optional bias Add, and the value the rest of the graph reads."""

    matmul: ir.Node
    bias_add: ir.Node | None
    bias: ir.Value | None

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.matmul).outputs[0]

    @property
    def single_reader(self) -> bool:
        return len(list(self.output.uses())) == 1 and not self.output.is_graph_output()

    @property
    def width(self) -> int:
        return self.matmul.inputs[1].const_value.shape[1]


def _only_user(value: ir.Value) -> ir.Node | None:
    users = list(value.uses())
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0].node


def _constant_bias(add: ir.Node, matmul_out: ir.Value) -> ir.Value | None:
    other = add.inputs[1] if add.inputs[0] is matmul_out else add.inputs[0]
    const = other.const_value if other is not None else None
    return other if const is not None and len(const.shape) == 1 else None


def projection(value: ir.Value | None, with_bias: bool = True) -> Projection | str:
    """The Projection producing ``value``, or why it is not one (a reason for the compile report)."""
    node = value.producer() if value is not None else None
    bias_add, bias = None, None
    if with_bias and node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        inner = next((v.producer() for v in node.inputs if v is not None and v.producer() is not None
                      and v.producer().op_type == "MatMul"), None)
        if inner is not None and (bias := _constant_bias(node, inner.outputs[0])) is not None:
            bias_add, node = node, inner
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return f"{value.name if value is not None else 'an input'} is not produced by a MatMul (+ bias)"
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2 \
            or weight.dtype not in FLOAT_WEIGHTS:
        return f"{node.name}: its weight is not a constant 2-D float matrix"
    if node.outputs[0].is_graph_output():
        return f"{node.name}: its output is a graph output"
    if bias_add is not None and (_only_user(node.outputs[0]) is None or bias.const_value.shape[0] != weight.shape[1]):
        return f"{bias_add.name}: the bias is shared or does not match the weight's N"
    return Projection(node, bias_add, bias)


def siblings_reason(projections: list[Projection]) -> str | None:
    """Why these projections cannot be packed into one MatMul, or None when they can."""
    inputs = {id(p.matmul.inputs[0]) for p in projections}
    if len(inputs) != 1:
        return "the projections do not read the same activation"
    weights = [p.matmul.inputs[1] for p in projections]
    if len({w.dtype for w in weights}) != 1 or len({w.const_value.shape[0] for w in weights}) != 1:
        return "the projection weights differ in dtype or K"
    if len({id(w) for w in weights}) != len(weights):
        return "two projections share one weight"
    biased = [p.bias is not None for p in projections]
    if any(biased) and not all(biased):
        return "some projections have a bias and some do not"
    return None


class Concatenated(ir.LazyTensor):
    """``tensors`` concatenated along ``axis`` when read; along axis 1 of [K, N_i] weights whose parts can read
    their own columns (a checkpoint's [N_i, K] rows, transposed), columns n0:n1 are read without the rest.

    Why columns: the quantizer reads a packed weight 64 MB at a time (passes/weight_codes.py). Reading it whole
    would transpose every part into a [K, N] copy and concatenate it (two passes over the weight, and the packed
    layer's weight in memory); by columns, each part's rows are copied side by side and the result is their
    transposed view: one copy, of the slice only."""

    def __init__(self, name: str, tensors: list, axis: int):
        shape = list(tensors[0].shape)
        shape[axis] = sum(t.shape[axis] for t in tensors)
        super().__init__(lambda: ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=axis),
                                           dtype=tensors[0].dtype),
                         dtype=tensors[0].dtype, shape=ir.Shape(shape), name=name)
        self.parts, self.axis = tensors, axis

    @property
    def read_columns(self):
        readers = [getattr(t, "read_columns", None) for t in self.parts]
        if self.axis != 1 or not all(callable(r) for r in readers):
            return None
        widths = [t.shape[1] for t in self.parts]
        return lambda start, stop: _columns(readers, widths, start, stop)


def _columns(readers, widths: list[int], start: int, stop: int) -> np.ndarray:
    """Columns start:stop of the parts side by side, as the transposed view of their rows stacked."""
    rows, offset = [], 0
    for read, width in zip(readers, widths):
        lo, hi = max(start, offset), min(stop, offset + width)
        if lo < hi:
            rows.append(read(lo - offset, hi - offset).T)
        offset += width
    return np.concatenate(rows, axis=0).T


def _concatenated(name: str, values: list[ir.Value], axis: int) -> ir.Value:
    lazy = Concatenated(name, [v.const_value for v in values], axis)
    return ir.Value(name=name, const_value=lazy, shape=lazy.shape, type=ir.TensorType(lazy.dtype))


def pack(graph: ir.Graph, projections: list[Projection], name: str) -> ir.Value:
    """One MatMul (+ one bias Add) computing every projection side by side; returns its output [.., sum N_i].

    The new nodes go before the first projection's MatMul; the old ones stay until their readers move.
    """
    first = projections[0].matmul
    weight = _concatenated(f"{name}.weight", [p.matmul.inputs[1] for p in projections], axis=1)
    graph.register_initializer(weight)
    matmul = ir.node("MatMul", [first.inputs[0], weight], name=f"{name}_MatMul")
    nodes, out = [matmul], matmul.outputs[0]
    if projections[0].bias is not None:
        bias = _concatenated(f"{name}.bias", [p.bias for p in projections], axis=0)
        graph.register_initializer(bias)
        add = ir.node("Add", [out, bias], name=f"{name}_Add")
        nodes.append(add)
        out = add.outputs[0]
    width = sum(p.width for p in projections)
    for node in nodes:
        node.outputs[0].dtype = first.outputs[0].dtype
        shape = first.outputs[0].shape
        node.outputs[0].shape = ir.Shape([*list(shape)[:-1], width]) if shape is not None else None
    graph.insert_before(first, nodes)
    return out


def split(graph: ir.Graph, packed: ir.Value, projections: list[Projection], name: str) -> None:
    """Hand each projection's readers its slice of ``packed`` (one Split on the last axis)."""
    sizes = ir.Value(name=f"{name}.split", const_value=ir.tensor(np.array([p.width for p in projections], np.int64)))
    sizes.shape, sizes.dtype = ir.Shape([len(projections)]), ir.DataType.INT64
    graph.register_initializer(sizes)
    node = ir.node("Split", [packed, sizes], attributes={"axis": -1}, num_outputs=len(projections), name=f"{name}_Split")
    graph.insert_after(packed.producer(), node)
    for projection_, part in zip(projections, node.outputs):
        part.dtype, part.shape = projection_.output.dtype, projection_.output.shape
        ir.convenience.replace_all_uses_with(projection_.output, part)


def remove(graph: ir.Graph, projections: list[Projection]) -> None:
    """Drop the replaced MatMuls and bias Adds (nothing reads them any more)."""
    for p in projections:
        graph.remove([n for n in (p.bias_add, p.matmul) if n is not None], safe=True)
