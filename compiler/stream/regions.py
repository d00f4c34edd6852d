"""Run a decoder graph one layer's weights at a time: the graph cut into regions, each run as its own session.

A node belongs to the region of the deepest layer it depends on: a weight named ``<layers>.<j>.*`` (or made from
one: ``..._q4``, ``.transpose``) or the cache input ``past_key_values.<j>.*`` puts it in region j, and a node
with neither follows the latest region among its inputs (the embedding runs before layer 0, the final norm and
head with the last layer); a node computed from weights alone runs in the first region that reads it (a tied head's
Transpose of the table, with the head). Each region becomes a small ONNX model of its own, built when it is about to run
(its inputs typed from the arrays that reach it), and values that cross from one region to a later one are held
in memory (hidden states: a few MB per window). Running the regions in order computes what the whole graph
computes, with one region's weights in memory at a time.

Two sources: an artifact on disk (region files are written beside model.onnx and keep pointing into
model.onnx.data, so ONNX Runtime maps only that region's weights) and a graph in memory whose weights are
still lazy (the fp32 graph before quantization: each region's weights are written to a scratch directory just
before it runs and deleted after). The streamed compile's parity check, --eval and GPTQ's calibration use it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ...runtimes.ort_compat import session_options

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
    _defer_weight_transforms(graph, regions)
    return regions


def _defer_weight_transforms(graph: ir.Graph, regions: dict[ir.Node, int]) -> None:
    """A node computed from weights alone runs in the first region that reads it, not where its weights' names put
    it: a tied head's Transpose of the embedding table would otherwise run in the prologue, and its vocab x hidden
    result (1 GB at the 1B shape) would be held across every layer's region, once per window (GPTQ's 16
    calibration windows at the 1B shape: 16 GB, which took a 24 GB machine out of memory)."""
    nodes = list(graph)
    weight_only: set[ir.Node] = set()
    for node in nodes:
        if all(v is None or (v.producer() in weight_only if v.producer() is not None else
                             v.is_initializer() and not v.is_graph_input()) for v in node.inputs):
            weight_only.add(node)
    for node in reversed(nodes):  # consumers first, so a chain of weight transforms moves as one
        if node not in weight_only or any(out.is_graph_output() for out in node.outputs):
            continue
        readers = [regions[c] for out in node.outputs for c in out.consumers()]
        if readers and min(readers) > regions[node]:
            regions[node] = min(readers)


class RegionRunner:
    """``model`` as a chain of per-region sessions. ``directory``: where region files go; for a loaded artifact its
    own directory (the weights stay in model.onnx.data), for an in-memory graph None (a scratch directory that
    holds one region's weights at a time)."""

    def __init__(self, model: ir.Model, directory: Path | None = None):
        self.model, self.graph = model, model.graph
        self.regions = assign_regions(self.graph)
        self.order = sorted(set(self.regions.values()))
        self.outputs = [v.name for v in self.graph.outputs]
        self._nodes = {r: [n for n in self.graph if self.regions[n] == r] for r in self.order}
        self._inputs = {r: self._crossing(r) for r in self.order}
        self._produces = {r: self._leaving(r) for r in self.order}
        self._directory = directory

    @classmethod
    def from_artifact(cls, model_path: Path) -> "RegionRunner":
        return cls(ir.load(model_path), Path(model_path).parent)

    def region_nodes(self, region: int) -> list[ir.Node]:
        return self._nodes[region]

    def _crossing(self, region: int) -> list[ir.Value]:
        inside = {out for n in self._nodes[region] for out in n.outputs}
        seen: dict[ir.Value, None] = {}
        for node in self._nodes[region]:
            for value in node.inputs:
                if value is not None and value not in inside and not (value.is_initializer() and not value.is_graph_input()):
                    seen.setdefault(value, None)
        return list(seen)

    def _leaving(self, region: int) -> list[ir.Value]:
        return [out for n in self._nodes[region] for out in n.outputs
                if out.is_graph_output() or any(self.regions[c] != region for c in out.consumers())]

    def run(self, batches: list[dict[str, np.ndarray]], on_region=lambda region: None,
            finish: Callable[[int, dict[str, np.ndarray]], None] | None = None) -> list[dict[str, np.ndarray]]:
        """The graph outputs for each feed dict of ``batches`` (by graph input name). Each region's session is
        loaded once and runs every batch before the next loads. ``finish(batch index, outputs)``, when given,
        receives each batch's outputs as soon as they exist and they are not kept (perplexity over many windows
        holds one window's logits at a time)."""
        held = [dict(feeds) for feeds in batches]
        for region in self.steps(held, finish=finish):
            on_region(region)
        return [] if finish is not None else [{name: values[name] for name in self.outputs} for values in held]

    def steps(self, held: list[dict[str, np.ndarray]], watch: Callable[[int], list[ir.Value]] = lambda region: [],
              seen: Callable[[int, int, dict[str, np.ndarray]], None] = lambda region, batch, values: None,
              finish: Callable[[int, dict[str, np.ndarray]], None] | None = None, keep_outputs: bool = True):
        """Run the regions in order over the feed dicts ``held`` (updated in place with what crosses on), yielding
        each region's index when every batch has been through it: a caller can stop between regions. ``watch``
        names values inside a region to hand to ``seen(region, batch index, {name: array})`` (GPTQ's MatMul
        inputs); they are not kept. ``keep_outputs=False``: graph outputs too are dropped once ``seen`` has had
        them and no later region reads them (the KV calibration takes each layer's cache and needs no logits)."""
        for region in self.order:
            extra = [v for v in watch(region) if v not in self._produces[region]]
            with self._region_file(region, held[0], extra) as path:
                session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
                names = [v.name for v in self._produces[region]] + [v.name for v in extra]
                for index, values in enumerate(held):
                    produced = dict(zip(names, session.run(names, {v.name: values[v.name] for v in self._inputs[region]})))
                    seen(region, index, produced)
                    # copies: onnxruntime >= 1.32 returns views of its OrtValues, and a view held across regions
                    # keeps that region session's whole memory arena alive (measured at the 1B shape: +0.13 GB of
                    # resident memory per region, 2 GB by the head); the copies are a few MB per window
                    values.update({v.name: np.array(produced[v.name]) for v in self._produces[region]})
                    del produced
                    for name in self._spent(region, keep_outputs):
                        values.pop(name, None)
                    if finish is not None and region == self.order[-1]:
                        finish(index, {name: values.pop(name) for name in self.outputs})
                del session
            yield region

    def _spent(self, region: int, keep_outputs: bool = True) -> list[str]:
        """Values no region after ``region`` reads (dropped as soon as they are spent); graph outputs are kept for
        the caller unless ``keep_outputs`` is False."""
        later = {v.name for r in self.order if r > region for v in self._inputs[r]}
        return [v.name for r in self.order if r <= region for v in self._produces[r]
                if v.name not in later and not (keep_outputs and v.name in self.outputs)]

    def _region_file(self, region: int, example: dict[str, np.ndarray], extra: list[ir.Value]):
        sub = _extract(self.model, self._nodes[region], self._inputs[region], self._produces[region] + extra, example)
        return _SavedRegion(sub, self._directory, region)


def _extract(model: ir.Model, nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value],
             example: dict[str, np.ndarray]) -> ir.Model:
    """A model of ``nodes`` alone: crossing values as inputs typed like the arrays in ``example``, the weights
    they read as initializers (the same tensors, not copies), ``outputs`` untyped (ONNX Runtime infers them)."""
    mapping: dict[ir.Value, ir.Value] = {}
    graph_inputs = []
    for value in inputs:
        dtype = ir.DataType.from_numpy(example[value.name].dtype)
        mapping[value] = ir.Value(name=value.name, type=ir.TensorType(dtype))
        graph_inputs.append(mapping[value])
    initializers = []
    clones = []
    for node in nodes:
        args = []
        for value in node.inputs:
            if value is not None and value not in mapping:  # a weight (crossing values are mapped above)
                mapping[value] = ir.Value(name=value.name, type=value.type, shape=value.shape, const_value=value.const_value)
                initializers.append(mapping[value])
            args.append(mapping[value] if value is not None else None)
        clone = ir.Node(node.domain, node.op_type, args, list(node.attributes.values()), overload=node.overload,
                        num_outputs=len(node.outputs), version=node.version, name=node.name)
        for old, new in zip(node.outputs, clone.outputs):
            mapping[old] = new
            new.name, new.type, new.shape = old.name, old.type, old.shape
        clones.append(clone)
    graph = ir.Graph(graph_inputs, [mapping[v] for v in outputs], nodes=clones, initializers=initializers,
                     opset_imports=dict(model.opset_imports), name="region")
    return ir.Model(graph, ir_version=model.ir_version)


class _SavedRegion:
    """Context manager: the region written as an .onnx file (and, for an in-memory graph, its weights), removed
    on exit."""

    def __init__(self, model: ir.Model, directory: Path | None, region: int):
        self.model, self.directory, self.region = model, directory, region
        self.scratch = None

    def __enter__(self) -> Path:
        if self.directory is not None:  # an artifact: the weights stay where they are
            self.path = self.directory / f".region-{os.getpid()}-{self.region + 1:04d}.onnx"
            ir.save(self.model, self.path)
        else:
            self.scratch = Path(tempfile.mkdtemp(prefix="luffy-region-"))
            self.path = self.scratch / "region.onnx"
            ir.save(self.model, self.path, external_data="region.onnx.data")
        return self.path

    def __exit__(self, *exc) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)
