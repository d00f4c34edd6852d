"""What a luffy plugin is: one custom op, its ORT counterpart and its TensorRT implementation.

A plugin node lives in the ``luffy`` domain. TensorRT's ONNX parser imports an op it has no importer for
as a plugin: the creator named by the node's op_type, ``plugin_version`` and ``plugin_namespace``
attributes (and, from 10.10, the node's domain as namespace). ONNX Runtime runs the same node through
the model-local ONNX function the artifact carries for it: ORT inlines model-local functions, so the
portable graph stays checkable at parity on any machine, at ORT's native speed, with no ORT custom-op
library to ship (onnxruntime-extensions' Python ops would run Python per call and hold the GIL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx
import onnx_ir as ir
from onnxscript.rewriter import RewriteRule

DOMAIN = "luffy"
VERSION = "1"


@dataclass(frozen=True)
class Plugin:
    """One custom op and where it is used.

    ``rules`` rewrite the pattern the op replaces into the plugin node; ``function(opset)`` is the op's
    ONNX definition (the ORT counterpart); ``register_tensorrt()`` registers the TensorRT implementation
    through ``tensorrt.plugin`` and is only ever called on a machine with TensorRT. It is needed for
    TensorRT versions in ``[min_trt, native_since)``: from the first parser that prefers a registered
    plugin over a local function, until the first parser with the standard op.
    """

    name: str
    rules: Callable[[], list[RewriteRule]]
    function: Callable[[int], onnx.FunctionProto]
    register_tensorrt: Callable[[], None]
    min_trt: tuple[int, ...]
    native_since: tuple[int, ...]
    domain: str = DOMAIN
    version: str = VERSION

    @property
    def plugin_id(self) -> str:
        return f"{self.domain}::{self.name}"

    def needed_for(self, trt_version: tuple[int, ...]) -> bool:
        return self.min_trt <= trt_version < self.native_since

    def attach_function(self, model: ir.Model) -> None:
        """Give ``model`` this op's ONNX function and the domain import, so ONNX Runtime can run it."""
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        function = ir.serde.deserialize_function(self.function(opset))
        model.functions[function.identifier()] = function
        model.opset_imports[self.domain] = int(self.version)


def function_proto(name: str, opset: int, inputs: list[str], outputs: list[str], attributes: list[str],
                   nodes: list[onnx.NodeProto], doc: str) -> onnx.FunctionProto:
    """A model-local function in the luffy domain."""
    return onnx.helper.make_function(
        DOMAIN, name, inputs, outputs, nodes,
        [onnx.helper.make_opsetid("", opset)], attributes=attributes, doc_string=doc,
    )


def attribute_ref(name: str, attr_type: int, refers_to: str) -> onnx.AttributeProto:
    """An attribute whose value is the calling node's attribute ``refers_to`` (ONNX's ref_attr_name)."""
    return onnx.AttributeProto(name=name, ref_attr_name=refers_to, type=attr_type)
