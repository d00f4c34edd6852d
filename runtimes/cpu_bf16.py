"""Running a bfloat16 graph on ONNX Runtime's CPU provider, which has no bf16 kernels but Cast.

This is the check path for bf16 artifacts (parity, --eval perplexity, tests, luffy.load on a machine
without a GPU): every bf16 value becomes fp32 holding a bf16-exact number. Each op computes in fp32 from
bf16-exact inputs and its output is rounded to bf16 (Cast to bf16 and back, round-to-nearest-even like
torch's), which is what bf16 GPU kernels do: bf16 storage, fp32 accumulation. It is slower than the fp32
graph and not a serving mode; GPU providers and TensorRT run the artifact's own bf16 graph.

luffy's own rather than ORT's InsertCastTransformer, which only inserts casts for fp16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import ArtifactError

BF16, FLOAT = ir.DataType.BFLOAT16, ir.DataType.FLOAT
_MAX_PROTO_BYTES = 1_800_000_000  # a serialized ModelProto must stay under protobuf's 2 GB


def has_bf16(model_path: Path) -> bool:
    """Whether the graph at ``model_path`` has any bfloat16 tensor (read without its weights)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    graph = proto.graph
    typed = [*graph.input, *graph.output, *graph.value_info]
    if any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in typed):
        return True
    if any(t.data_type == onnx.TensorProto.BFLOAT16 for t in graph.initializer):
        return True
    return any(n.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.BFLOAT16
               for n in graph.node for a in n.attribute)


def emulate_bf16(model: ir.Model) -> int:
    """Rewrite ``model`` in place to fp32 with a bf16 rounding after every value that was bf16.

    Returns the number of values rounded.

    >>> emulate_bf16(model)            # doctest: +SKIP
    57
    """
    graph = model.graph
    for value in list(graph.initializers.values()):
        if value.dtype == BF16:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
            value.dtype = FLOAT
    to_round = [v for v in graph.inputs if v.dtype == BF16]
    for node in list(graph):
        for name, attr in node.attributes.items():
            if node.op_type == "Cast" and name == "to" and attr.value == BF16:
                node.attributes["to"] = ir.AttrInt64("to", FLOAT)  # the rounding pair below does the bf16 part
            elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == BF16:
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy().astype(np.float32)))
            elif attr.type == ir.AttributeType.INT and attr.value == BF16 and name in ("dtype", "to"):
                raise NotImplementedError(f"bf16 emulation: node {node.name} ({node.op_type}) attribute {name}")
        to_round += [o for o in node.outputs if o.dtype == BF16]
    for value in to_round:
        _round_through_bf16(graph, value)
    return len(to_round)


def _round_through_bf16(graph: ir.Graph, value: ir.Value) -> None:
    value.dtype = FLOAT
    name = value.name
    is_input = value.producer() is None
    if not is_input:
        value.name = f"{name}__fp32"  # the rounded value takes the name: graph outputs keep theirs
    down = ir.node("Cast", [value], {"to": BF16}, name=f"{name}__round_bf16")
    up = ir.node("Cast", [down.outputs[0]], {"to": FLOAT}, name=f"{name}__back_fp32")
    down.outputs[0].dtype, up.outputs[0].dtype = BF16, FLOAT
    down.outputs[0].shape = up.outputs[0].shape = value.shape
    value.replace_all_uses_with(up.outputs[0], replace_graph_outputs=True)
    down.replace_input_with(0, value)  # replace_all_uses_with also rewired the rounding's own input
    if is_input:
        graph.insert_before(graph.node(0), [down, up])
        down.outputs[0].name, up.outputs[0].name = f"{name}__bf16", f"{name}__rounded"
    else:
        graph.insert_after(value.producer(), [down, up])
        down.outputs[0].name, up.outputs[0].name = f"{name}__bf16", name


def cpu_model(model_path: Path) -> str | bytes:
    """What to hand ``ort.InferenceSession`` for ``model_path`` on the CPU: the path itself, or, for a
    bf16 graph, the serialized fp32 emulation of it."""
    if not has_bf16(model_path):
        return str(model_path)
    model = ir.load(str(model_path))
    emulate_bf16(model)
    proto = ir.to_proto(model)
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise ArtifactError(f"{model_path}: bf16 emulation on CPU is a check path for graphs under 1.8 GB; "
                         "run this artifact on a GPU provider")
    return proto.SerializeToString()
