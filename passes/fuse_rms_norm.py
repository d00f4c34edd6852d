"""RMSNorm -> SimplifiedLayerNormalization.

x * rsqrt(mean(x^2) + eps) * w, exported as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul (6-8 nodes), becomes one
SimplifiedLayerNormalization, the op ONNX Runtime's CPU and CUDA providers implement with fp32
accumulation. The rule is onnxscript's: it checks eps is a scalar constant and the reduction is over the
last axis, so a norm over another axis is left alone.
"""

from __future__ import annotations

from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_ruleset

from .rule_pass import RulePass


def fuse_rms_norm() -> RulePass:
    return RulePass(rms_normalization_ruleset)
