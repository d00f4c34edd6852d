"""Read an existing .onnx file (with external data) as a capture result.

External data is the one place an ONNX file can make a reader touch other files, so every location is
checked before anything is loaded: no absolute paths, no `..`, no symlinks, nothing outside the model's
directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import onnx_ir as ir

from ...errors import SourceError, UnsupportedModelError, first_line
from .torch_export import Captured, KVLayout
from ..sources.resolve import CAUSAL_LM

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def _external_locations(proto: onnx.ModelProto):
    def tensors_of(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors_of(sub)

    for tensor in tensors_of(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            yield tensor.name, info.get("location", "")


def check_external_data(path: Path, proto: onnx.ModelProto) -> list[str]:
    """Return the external data files ``proto`` reads, refusing any that escape ``path``'s directory."""
    base = path.parent.resolve()
    files = set()
    for tensor_name, location in _external_locations(proto):
        loc = Path(location)
        where = f"{path}: initializer {tensor_name!r} external data location {location!r}"
        if not location or loc.is_absolute() or ".." in loc.parts:
            raise SourceError(f"{where} must be a relative path inside the model's directory")
        target = base / loc
        if target.is_symlink():
            raise SourceError(f"{where} is a symbolic link; refusing to follow it")
        if not target.resolve().is_relative_to(base):
            raise SourceError(f"{where} resolves outside {base}")
        if not target.is_file():
            raise SourceError(f"{where}: file not found")
        files.add(location)
    return sorted(files)


def load_onnx_source(path: Path) -> Captured:
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise SourceError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})") from None
    # protobuf parses many non-ONNX byte strings as a model with an empty graph: refuse what has nothing to run
    if not proto.graph.node or not proto.graph.output:
        what = "no nodes" if not proto.graph.node else "no outputs"
        raise SourceError(f"{path}: graph has {what}; not an ONNX model luffy can compile")
    check_external_data(path, proto)
    try:
        model = ir.load(str(path))
        # Pull external tensors into memory now: the artifact is written elsewhere, so nothing may keep
        # pointing at the source directory.
        for value in model.graph.initializers.values():
            if value.const_value is not None and isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    except Exception as exc:
        raise SourceError(f"{path}: cannot load ({type(exc).__name__}: {first_line(exc)})") from None
    kv = decoder_layout(model)
    return Captured(model, CAUSAL_LM if kv else "module", kv)


def decoder_layout(model: ir.Model) -> KVLayout | None:
    """If the graph follows the step-graph convention (past_key_values.N.* -> present.N.*), its KV layout."""
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name for v in model.graph.outputs}
    layers: dict[int, dict[str, ir.Value]] = {}
    for name, value in inputs.items():
        m = _PAST_RE.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers or "input_ids" not in inputs or "logits" not in outputs:
        return None
    heads, dims = [], []
    for layer in range(len(layers)):
        pair = layers.get(layer, {})
        if set(pair) != {"key", "value"} or f"present.{layer}.key" not in outputs or f"present.{layer}.value" not in outputs:
            raise UnsupportedModelError(f"{model.graph.name or 'graph'}: KV cache I/O for layer {layer} is incomplete")
        shape = pair["key"].shape
        if shape is None or len(shape) != 4 or not all(isinstance(shape[i], int) for i in (1, 3)):
            raise UnsupportedModelError(
                f"input past_key_values.{layer}.key: expected shape [batch, kv_heads, past, head_dim] with static "
                f"kv_heads and head_dim, got {shape}"
            )
        if pair["key"].dtype != ir.DataType.FLOAT:
            raise UnsupportedModelError(f"input past_key_values.{layer}.key: dtype {pair['key'].dtype} (float32 expected)")
        heads.append(shape[1])
        dims.append(shape[3])
    return KVLayout(len(layers), heads, dims)
