"""Run an artifact one layer's weights at a time: its graph cut into regions, each run as its own session.

A node belongs to the region of the deepest layer it depends on: a weight named ``<layers>.<j>.*`` (or made from
one: ``..._q4``, ``.transpose``) or the cache input ``past_key_values.<j>.*`` puts it in region j, and a node
with neither follows the latest region among its inputs (the embedding runs before layer 0, the final norm and
head with the last layer). Each region becomes a small ONNX model beside the artifact whose initializers still
point into ``model.onnx.data``, so ONNX Runtime maps only that region's weights; values that cross from one
region to a later one are held in memory (hidden states for a short prompt). Running the regions in order
computes what the whole graph computes, with one layer's weights loaded at a time: the streamed compile's
parity check and perplexity use it on models whose artifact does not fit in memory whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir

_LAYER_WEIGHT = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
_CACHE = re.compile(r"^(?:past_key_values|present)\.(\d+)\.")
PROLOGUE = -1


def _anchor(value: ir.Value) -> int:
    name = value.name or ""
    if value.is_initializer():
        match = _LAYER_WEIGHT.search(name)
        return int(match.group(1)) if match else PROLOGUE
    match = _CACHE.match(name) if value.is_graph_input() else None
    return int(match.group(1)) if match else PROLOGUE


def assign_regions(graph: ir.Graph) -> dict[ir.Node, int]:
    """Region of every node: the deepest layer among its weights, cache inputs and producers' regions."""
    regions: dict[ir.Node, int] = {}
    for node in graph:  # topological order
        region = PROLOGUE
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            region = max(region, regions[producer] if producer is not None else _anchor(value))
        regions[node] = region
    return regions


class RegionRunner:
    """The artifact at ``model_path`` as a chain of per-region sessions; ``run(feeds)`` gives the graph outputs.

    The region models are written beside the artifact's model file under a hidden prefix (ONNX Runtime reads
    external data only from the model file's directory) and removed by ``close()``."""

    def __init__(self, model_path: Path):
        self.model_path = Path(model_path)
        model = ir.load(self.model_path)
        graph = model.graph
        _complete_types(graph, self.model_path)
        regions = assign_regions(graph)
        self.order = sorted(set(regions.values()))
        self.outputs = [v.name for v in graph.outputs]
        self._prefix = f".regions-{os.getpid()}-{id(self):x}"
        self.files, self.inputs, self.produces = {}, {}, {}
        for region in self.order:
            self.files[region], self.inputs[region], self.produces[region] = self._region_model(model, regions, region)

    def _region_model(self, model: ir.Model, regions: dict, region: int) -> tuple[Path, list[str], list[str]]:
        graph = model.graph
        nodes = [n for n in graph if regions[n] == region]
        inside = {out for n in nodes for out in n.outputs}
        crossing = {}  # values made elsewhere -> this region's input
        initializers = {}
        for node in nodes:
            for value in node.inputs:
                if value is None or value in inside:
                    continue
                if value.is_initializer() and not value.is_graph_input():
                    initializers[value.name] = value
                elif value not in crossing:
                    crossing[value] = value
        outputs = [out for out in inside if out.is_graph_output() or
                   any(regions[c] != region for c in out.consumers())]
        sub = ir.Graph(
            inputs=[_copy(v) for v in crossing], outputs=[_copy(v) for v in outputs], nodes=[],
            initializers=[], opset_imports=dict(model.opset_imports), name=f"region_{region}")
        path = self.model_path.parent / f"{self._prefix}-{region + 1:04d}.onnx"
        _save_region(model, sub, nodes, crossing, initializers, outputs, path)
        return path, [v.name for v in crossing], [v.name for v in outputs]

    def run(self, batches: list[dict[str, np.ndarray]], on_region=lambda region: None) -> list[dict[str, np.ndarray]]:
        """All graph outputs for each feed dict of ``batches`` (by graph input name), loading one region's session
        at a time and running every batch through it before the next region loads."""
        import onnxruntime as ort

        from ...runtimes.ort_compat import session_options

        values = [dict(feeds) for feeds in batches]
        for region in self.order:
            on_region(region)
            session = ort.InferenceSession(str(self.files[region]), session_options(), providers=["CPUExecutionProvider"])
            for held in values:
                produced = session.run(self.produces[region], {name: held[name] for name in self.inputs[region]})
                held.update(zip(self.produces[region], produced))
                for name in self._spent(region):  # crossing values no later region reads
                    held.pop(name, None)
            del session
        return [{name: held[name] for name in self.outputs} for held in values]

    def _spent(self, region: int) -> list[str]:
        later = {name for r in self.order if r > region for name in self.inputs[r]}
        return [name for r in self.order if r <= region for name in self.produces[r]
                if name not in later and name not in self.outputs]

    def close(self) -> None:
        for path in self.files.values():
            path.unlink(missing_ok=True)


def _complete_types(graph: ir.Graph, model_path: Path) -> None:
    """Give every value its element type (a region's inputs must declare one): ONNX Runtime's symbolic shape
    inference knows the com.microsoft ops the fusions emit (compiler/memory.py runs it for the report too)."""
    from ..memory import infer

    types = {v.name: v.type.tensor_type.elem_type for v in infer(model_path).graph.value_info}
    for node in graph:
        for value in node.outputs:
            if value.type is None and types.get(value.name):
                value.type = ir.TensorType(ir.DataType(types[value.name]))


def _copy(value: ir.Value) -> ir.Value:
    return ir.Value(name=value.name, type=value.type, shape=value.shape.copy() if value.shape is not None else None)


def _save_region(model, sub, nodes, crossing, initializers, outputs, path: Path) -> None:
    """Serialize the region's nodes as a model of their own, weights still referring to the artifact's data."""
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(ir.serde.serialize_model(ir.Model(sub, ir_version=model.ir_version)))
    proto.graph.node.extend(ir.serde.serialize_node(n) for n in nodes)
    for value in initializers.values():
        tensor = ir.serde.serialize_tensor(value.const_value)
        tensor.name = value.name
        proto.graph.initializer.append(tensor)
    onnx.save(proto, path)
