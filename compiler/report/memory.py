"""Liveness-based activation-memory estimate for the compile report.

ONNX Runtime's symbolic shape inference (it knows the com.microsoft ops the fusions emit) gives every value
a shape in named dims; binding those names for a scenario (a prefill of N tokens, or one decode step after
N) sizes every intermediate. Walking the nodes in graph order, a value lives from the node that makes it
to its last reader; the largest total alive at once is the peak. It is the graph's own need: ORT's arena,
its in-place kernels and its own fusions can only lower it, and weights and the KV cache are not included
(the KV cache is kv_cache.bytes_per_token in the manifest).
"""

from __future__ import annotations

import ast
import contextlib
import operator
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _dim_value(dim, bindings: dict[str, int]) -> int | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    text = dim.dim_param
    if not text:
        return None

    def evaluate(node):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return bindings[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](evaluate(node.left), evaluate(node.right))
        raise KeyError(text)

    try:
        return int(evaluate(ast.parse(text, mode="eval")))
    except (KeyError, SyntaxError):
        return None  # a dim the scenario does not fix (e.g. one the inference invented)


def _nbytes(value_info, bindings) -> int | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    sizes = [_dim_value(d, bindings) for d in tensor.shape.dim]
    if any(s is None for s in sizes):
        return None
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
    return int(np.prod(sizes, dtype=np.int64)) * itemsize


SMALL_TENSOR_ELEMENTS = 64


def infer(model_path: Path) -> onnx.ModelProto:
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    proto = onnx.load(str(model_path), load_external_data=False)  # shapes only: weights stay on disk
    # ...except small external tensors (scales, shape constants), whose values shape inference reads;
    # quantizers can leave even scalars in the data file.
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor) and int(np.prod(tensor.dims, dtype=np.int64)) <= SMALL_TENSOR_ELEMENTS:
            load_external_data_for_tensor(tensor, str(model_path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    inference = SymbolicShapeInference(2**31 - 1, True, True, 0)
    # Its handlers are keyed by op type alone and written for com.microsoft's Attention and friends; the
    # opset-23 standard ops of the same names (the TensorRT target's) get their own shape rule.
    for op_type in STANDARD_OPS_WITH_CONTRIB_NAMES:
        inference.dispatcher_[op_type] = _by_domain(inference, op_type, inference.dispatcher_.get(op_type))
    from ...plugins import PLUGINS

    for plugin in PLUGINS:  # ORT's inference knows no luffy op; each plugin's output is its input's like()
        inference.dispatcher_[plugin.name] = _like_first_input(inference)
    inference.dispatcher_["GatherBlockQuantized"] = _gather_block_quantized(inference)
    inference._preprocess(proto)
    complete = False
    # It reads a constant's value (numpy_helper.to_array, relative to the working directory) when shape
    # arithmetic or a quantizer's scale needs it; the larger external ones are found beside the model.
    with contextlib.chdir(model_path.parent):
        while inference.run_:
            complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise ValueError(f"{model_path}: symbolic shape inference could not finish")
    return inference.out_mp_


STANDARD_OPS_WITH_CONTRIB_NAMES = ("Attention", "RotaryEmbedding", "RMSNormalization")


def _by_domain(inference, op_type: str, contrib_handler):
    def dispatch(node):
        if node.domain not in ("", "ai.onnx"):
            if contrib_handler is not None:
                contrib_handler(node)
            return
        shape = inference._get_shape(node, 0)
        if op_type == "Attention" and len(shape) == 4:  # [batch, q_heads, q_seq, v_head_size]
            shape = shape[:-1] + inference._get_shape(node, 2)[-1:]
        dtype = inference.known_vi_[node.input[0]].type.tensor_type.elem_type
        inference.known_vi_[node.output[0]].CopyFrom(onnx.helper.make_tensor_value_info(node.output[0], dtype, shape))
    return dispatch


def _gather_block_quantized(inference):
    # ORT's rule takes the row width from the data's shape, which for uint8 data packing several codes per byte
    # (a table shared with MatMulNBits) is the packed width: 1024 bytes for 2048 int4 values.
    def dispatch(node):
        data = inference._get_shape(node, 0)
        attributes = {a.name: a for a in node.attribute}
        bits = attributes["bits"].i if "bits" in attributes else 4
        packed = inference.known_vi_[node.input[0]].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        width = data[-1] * (8 // bits) if packed and isinstance(data[-1], int) else data[-1]
        dtype = inference.known_vi_[node.input[2]].type.tensor_type.elem_type
        shape = inference._get_shape(node, 1) + data[1:-1] + [width]
        inference.known_vi_[node.output[0]].CopyFrom(onnx.helper.make_tensor_value_info(node.output[0], dtype, shape))
    return dispatch


def _like_first_input(inference):
    def dispatch(node):
        source = inference.known_vi_[node.input[0]]
        inference.known_vi_[node.output[0]].CopyFrom(onnx.helper.make_tensor_value_info(
            node.output[0], source.type.tensor_type.elem_type, inference._get_shape(node, 0)))
    return dispatch


def peak_activation(inferred: onnx.ModelProto, bindings: dict[str, int]) -> dict:
    """Peak bytes of intermediate values alive at once, executing nodes in graph order."""
    graph = inferred.graph
    infos = {v.name: v for v in [*graph.value_info, *graph.output]}
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = index
    keep_to_end = {v.name for v in graph.output}
    # constant subgraphs (a Reshape of a weight) are folded by ORT when the session loads: weights, not activations
    constant = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.input and all(not name or name in constant for name in node.input):
            constant.update(node.output)
    alive: dict[str, int] = {}
    peak, at_node, unknown = 0, "", 0
    for index, node in enumerate(graph.node):
        for name in node.output:
            if (name not in last_use and name not in keep_to_end) or name in constant:
                continue  # an optional output nothing reads (e.g. a norm's saved mean): never allocated
            size = _nbytes(infos[name], bindings) if name in infos else None
            if size is None:
                unknown += 1
                continue
            alive[name] = size
        current = sum(alive.values())
        if current > peak:
            peak, at_node = current, node.name or node.op_type
        for name in node.input:
            if last_use.get(name) == index and name in alive and name not in keep_to_end:
                del alive[name]
    return {"peak_activation_bytes": peak, "at_node": at_node, "values_of_unknown_size": unknown}


def decoder_memory_report(model_path: Path, tokens: int) -> dict:
    """Prefill of ``tokens`` tokens and one decode step after them, batch 1."""
    inferred = infer(model_path)
    prefill = {"batch": 1, "seq": tokens, "past": 0, "total": tokens, "max_seq": tokens, "kept": 1}
    decode = {"batch": 1, "seq": 1, "past": tokens, "total": tokens + 1, "max_seq": tokens + 1, "kept": 1}
    return {
        "method": "liveness over graph order, shapes from onnxruntime's symbolic shape inference; weights and KV cache excluded",
        "prefill": {"batch": 1, "tokens": tokens, **peak_activation(inferred, prefill)},
        "decode": {"batch": 1, "past_tokens": tokens, **peak_activation(inferred, decode)},
    }
