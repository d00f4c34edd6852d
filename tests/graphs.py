"""Small graphs for tests, built one way: an ONNX model from nodes, typed inputs and outputs and weights, and
the op counts of a graph (what the pass tests assert on)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper


def onnx_model(nodes: list[onnx.NodeProto], inputs: dict, outputs: dict, weights: dict | list = (), *,
               name: str = "graph", opset: int = 20, ir_version: int | None = 9) -> onnx.ModelProto:
    """A ModelProto of ``nodes``; ``inputs``/``outputs`` map a name to (elem type, shape), ``weights`` maps a
    name to a numpy array (or is a list of TensorProtos). ``ir_version`` None: onnx's newest.

    >>> m = onnx_model([helper.make_node("Relu", ["x"], ["y"])], {"x": (onnx.TensorProto.FLOAT, ["n"])},
    ...                {"y": (onnx.TensorProto.FLOAT, ["n"])})
    >>> op_counts(m)
    Counter({'Relu': 1})
    """
    tensors = [numpy_helper.from_array(np.asarray(a), n) for n, a in weights.items()] if isinstance(weights, dict) \
        else list(weights)
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
                              [helper.make_tensor_value_info(n, t, s) for n, (t, s) in outputs.items()], tensors)
    versions = {} if ir_version is None else {"ir_version": ir_version}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **versions)


def op_counts(model: ir.Model | ir.Graph | onnx.ModelProto, subgraphs: bool = False) -> collections.Counter:
    """How many nodes of each op type the main graph holds (``subgraphs``: those of If/Loop bodies too)."""
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    graph = model.graph if isinstance(model, ir.Model) else model
    nodes = ir.traversal.RecursiveGraphIterator(graph) if subgraphs else graph
    return collections.Counter(node.op_type for node in nodes)
