"""Weight transforms that wait for their tensor: derived lazy tensors, and the fold that makes them.

A graph whose weights are `CheckpointTensor`s must not compute on them eagerly: the exporter's constant
folding would turn ``Transpose(W)`` into a numpy array held until the artifact is written, and a whole model's
worth of them is the whole model in memory. `fold_weight_transforms` replaces each such layout transform of a
lazy tensor (Transpose, Cast, Reshape, Squeeze, Unsqueeze, Identity) by a `DerivedTensor` that applies it when
its bytes are read, one tensor at a time, as the artifact is written. Like the exporter's folding, it leaves a
transform of a tensor something else also reads (a tied embedding's Transpose into the head): folding that one
would store the table twice. What it leaves (arithmetic on a lazy
tensor) the usual constant folding still folds under its size limits, so only small tensors are computed early.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import onnx_ir as ir

from ...passes.dedupe_initializers import fingerprint


class DerivedTensor(ir.LazyTensor):
    """A tensor computed from lazy ``inputs`` by ``func`` (numpy arrays in, one array out) when it is read.

    ``recipe`` names the computation; with the inputs' fingerprints it identifies the values, so two derived
    tensors with one recipe over equal inputs are equal without reading either."""

    def __init__(self, func: Callable[..., np.ndarray], inputs: list, recipe: str, dtype: ir.DataType,
                 shape: ir.Shape, name: str | None = None):
        super().__init__(self._evaluate, dtype=dtype, shape=shape, name=name)
        self.func, self.inputs, self.recipe = func, inputs, recipe

    def _evaluate(self) -> ir.Tensor:
        arrays = [t.numpy() for t in self.inputs]
        return ir.tensor(np.ascontiguousarray(self.func(*arrays)), dtype=self.dtype, name=self.name)

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(self.recipe.encode(), digest_size=16)
        for tensor in self.inputs:
            digest.update(fingerprint(tensor).encode())
        return f"derived:{self.recipe}:{digest.hexdigest()}"

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s for t in self.inputs for s in getattr(t, "sources", ()))

    @property
    def read_columns(self):
        """For the transpose of a tensor that reads its own rows: columns n0:n1 of this tensor without the rest
        (how quantization reads a Linear's weight, stored [out, in], as the MatMul's [in, out]); else None."""
        source = self.inputs[0] if len(self.inputs) == 1 else None
        rows = getattr(source, "read_rows", None)
        if self.recipe != "Transpose(1, 0)" or not callable(rows):
            return None
        return lambda start, stop: rows(start, stop).T


def is_lazy(tensor) -> bool:
    return isinstance(tensor, ir.LazyTensor)


def _transform(node: ir.Node, shape: tuple[int, ...], dtype: ir.DataType):
    """(numpy function of the lazy input, recipe, output shape, output dtype) for a layout node over one lazy
    tensor of ``shape``/``dtype``, else None. Output shapes are worked out here: a raw export has none yet."""
    attrs = node.attributes
    if node.op_type == "Transpose":
        perm = tuple(attrs["perm"].as_ints()) if "perm" in attrs else tuple(reversed(range(len(shape))))
        return (lambda x: np.transpose(x, perm)), f"Transpose{perm}", tuple(shape[p] for p in perm), dtype
    if node.op_type == "Cast":
        target = ir.DataType(attrs["to"].as_int())
        return (lambda x: x.astype(target.numpy())), f"Cast{target.name}", shape, target
    if node.op_type == "Identity":
        return (lambda x: x), "Identity", shape, dtype
    if node.op_type in ("Reshape", "Squeeze", "Unsqueeze"):
        target = _reshaped(node, shape)
        if target is None:
            return None
        return (lambda x: x.reshape(target)), f"Reshape{target}", target, dtype
    return None


def _reshaped(node: ir.Node, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    second = node.inputs[1] if len(node.inputs) > 1 else None
    values = [int(v) for v in second.const_value.numpy().reshape(-1)] if second is not None else None
    if node.op_type == "Reshape":
        if values is None or node.attributes.get("allowzero") is not None and node.attributes["allowzero"].value:
            return None
        target = [shape[i] if v == 0 else v for i, v in enumerate(values)]
        if target.count(-1) == 1:
            known = int(np.prod([d for d in target if d != -1]))
            target[target.index(-1)] = int(np.prod(shape)) // max(known, 1)
        return tuple(target) if int(np.prod(target)) == int(np.prod(shape)) else None
    axes = values if values is not None else (list(node.attributes["axes"].as_ints()) if "axes" in node.attributes else None)
    if node.op_type == "Squeeze":
        axes = [a % len(shape) for a in axes] if axes is not None else [i for i, d in enumerate(shape) if d == 1]
        return tuple(d for i, d in enumerate(shape) if i not in axes)
    if axes is None:
        return None
    rank = len(shape) + len(axes)
    axes = sorted(a % rank for a in axes)
    out, rest = [], iter(shape)
    for i in range(rank):
        out.append(1 if i in axes else next(rest))
    return tuple(out)


def fold_weight_transforms(model: ir.Model) -> int:
    """Replace layout nodes over lazy initializers by lazy derived initializers; returns how many."""
    graph = model.graph
    folded = 0
    made: dict[tuple[str, str], ir.Value] = {}  # (source, recipe) -> the derived initializer
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            continue
        source = node.inputs[0]
        if not (source.is_initializer() and is_lazy(source.const_value)) or len(node.outputs) != 1:
            continue
        if len(source.uses()) != 1:  # as the exporter's folding: a tied weight read twice keeps its Transpose node
            continue
        if any(v is not None and v.const_value is None for v in node.inputs[1:]):
            continue
        output = node.outputs[0]
        found = _transform(node, tuple(source.const_value.shape), source.const_value.dtype)
        if found is None or output.is_graph_output():
            continue
        func, recipe, shape, dtype = found
        if (source.name, recipe) not in made:
            name = f"{source.name}.{node.op_type.lower()}"
            while name in graph.initializers:
                name += "_"
            tensor = DerivedTensor(func, [source.const_value], recipe, dtype, ir.Shape(list(shape)), name=name)
            made[(source.name, recipe)] = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)),
                                                   const_value=tensor)
            graph.register_initializer(made[(source.name, recipe)])
        ir.convenience.replace_all_uses_with(output, made[(source.name, recipe)])
        graph.remove(node, safe=True)
        folded += 1
    return folded
