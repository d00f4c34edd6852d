"""luffy::RMSNorm: x * rsqrt(mean(x^2) + eps) * scale over the last axis, as one op for TensorRT 10.7-10.14.

TensorRT's ONNX parser gained RMSNormalization in 10.15. Before that a Llama-class graph reaches it
decomposed (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul), 2 norms per layer. This plugin turns each into one
node: TensorRT runs it as one kernel, ONNX Runtime runs the function below.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the registered functions'
annotations with ``inspect.signature`` and needs real classes, not strings.
"""

from typing import Tuple

import onnx
from onnxscript.rewriter import _ir_utils
from onnxscript.rewriter.ort_fusions.rms_normalization import RmsNormFusion

from .plugin import DOMAIN, VERSION, Plugin, attribute_ref, function_proto

NAME = "RMSNorm"


class RmsNormToPlugin(RmsNormFusion):
    """onnxscript's RMSNorm pattern (both Mul orders, optional casts); only the replacement differs."""

    def check(self, op, x, scale, epsilon, compute_dtype, target_dtype, **rest):
        result = super().check(op, x, scale, epsilon, compute_dtype, target_dtype, **rest)
        if not result:
            return result
        if x.dtype != scale.dtype:
            return result.fail(f"input is {x.dtype} but scale is {scale.dtype}; the plugin takes one dtype", scale)
        if self._stash_dtype != onnx.TensorProto.FLOAT:
            return result.fail("the norm is computed in double; the plugin computes in float32")
        return result

    def rewrite(self, op, x, scale, epsilon, **_):
        return op.RMSNorm(x, scale, epsilon=_ir_utils.get_singleton_value(epsilon),
                          plugin_namespace=DOMAIN, plugin_version=VERSION, _domain=DOMAIN)


def _rules():
    return [RmsNormToPlugin.rule("RmsNormToPlugin1", _mul_order=False),
            RmsNormToPlugin.rule("RmsNormToPlugin2", _mul_order=True)]


def _function(opset: int) -> onnx.FunctionProto:
    make = onnx.helper.make_node
    nodes = [
        make("Cast", ["X"], ["x32"], to=onnx.TensorProto.FLOAT),  # accumulate in fp32 whatever X is
        make("Mul", ["x32", "x32"], ["square"]),
        make("Constant", [], ["axes"], value=onnx.helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1])),
        make("ReduceMean", ["square", "axes"], ["mean_square"], keepdims=1),
        make("Constant", [], ["eps"]),
        make("Add", ["mean_square", "eps"], ["variance"]),
        make("Sqrt", ["variance"], ["rms"]),
        make("Reciprocal", ["rms"], ["inv_rms"]),
        make("Mul", ["x32", "inv_rms"], ["normalized32"]),
        make("CastLike", ["normalized32", "X"], ["normalized"]),
        make("Mul", ["normalized", "scale"], ["Y"]),
    ]
    nodes[4].attribute.append(attribute_ref("value_float", onnx.AttributeProto.FLOAT, "epsilon"))
    return function_proto(
        NAME, opset, ["X", "scale"], ["Y"], ["epsilon", "plugin_namespace", "plugin_version"], nodes,
        doc="RMS normalization over the last axis, computed in float32: X / sqrt(mean(X^2) + epsilon) * scale",
    )


_registered = False


def _register_tensorrt() -> None:
    global _registered
    if _registered:  # tensorrt.plugin refuses a second definition of one id
        return
    import tensorrt.plugin as trtp
    import torch

    @trtp.register(f"{DOMAIN}::{NAME}")
    def rms_norm_desc(x: trtp.TensorDesc, scale: trtp.TensorDesc, epsilon: float) -> Tuple[trtp.TensorDesc]:
        return x.like()

    @trtp.impl(f"{DOMAIN}::{NAME}")
    def rms_norm_impl(x: trtp.Tensor, scale: trtp.Tensor, epsilon: float, outputs: Tuple[trtp.Tensor],
                      stream: int) -> None:
        x_t = torch.as_tensor(x, device="cuda")
        out = torch.as_tensor(outputs[0], device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x32 = x_t.float()
            normalized = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + epsilon)
            out.copy_(normalized.to(x_t.dtype) * torch.as_tensor(scale, device="cuda"))

    _registered = True


RMS_NORM = Plugin(
    name=NAME,
    rules=_rules,
    function=_function,
    register_tensorrt=_register_tensorrt,
    # 10.7: the first parser that prefers a registered plugin over a local function of the same name
    # (10.6 has tensorrt.plugin but would inline the function); 10.15: RMSNormalization is native.
    min_trt=(10, 7),
    native_since=(10, 15),
)
