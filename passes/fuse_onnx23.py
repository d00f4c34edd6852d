"""Portable fusions for opset 23: RMSNormalization, RotaryEmbedding and Attention as standard ONNX ops.

The TensorRT target (and any runtime that reads standard ONNX) gets no com.microsoft ops. torch.onnx
already emits these three ops when luffy captures at opset 23; these rules (onnxscript's) recover them in
graphs that arrive decomposed, e.g. an .onnx source from another exporter. They only fire on opset-23
graphs; anything else is reported as not matched.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.fusion import _gqa, _rms_normalization, _rotary_embedding

from .rule_pass import RulePass

PORTABLE_OPSET = 23

_RULES = RewriteRuleSet([
    *_rms_normalization.rms_normalization_ruleset.rules,
    *_rotary_embedding.rotary_embedding_rules.rules,
    *_rotary_embedding.partial_embedding_rules.rules,
    *_gqa.gqa_rules.rules,
])


class FuseOnnx23(RulePass):
    def __init__(self):
        super().__init__(_RULES)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset != PORTABLE_OPSET:
            self.stats = {"matches": 0, "not_matched": [
                {"rule": "*", "reason": f"graph is opset {opset}; these standard ops need opset {PORTABLE_OPSET}"}]}
            return ir.passes.PassResult(model, modified=False)
        return super().call(model)


def fuse_onnx23() -> FuseOnnx23:
    return FuseOnnx23()
