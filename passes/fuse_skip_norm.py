"""Residual add + norm -> Skip(Simplified)LayerNormalization.

A decoder layer ends with `h = h + f(norm(h))`; the add that feeds the next norm and the norm itself
become one com.microsoft op that also returns the sum (the residual stream), saving a full pass over the
activations. Both the RMS (SkipSimplifiedLayerNormalization) and the LayerNorm (SkipLayerNormalization)
forms, from onnxscript's rules; they need the norm fused first (fuse-rms-norm, or torch's own
LayerNormalization).
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.ort_fusions.skip_normalization import (
    skip_layer_normalization_ruleset,
    skip_rms_normalization_ruleset,
)

from .rule_pass import RulePass


def fuse_skip_norm() -> RulePass:
    return RulePass(RewriteRuleSet([*skip_rms_normalization_ruleset.rules, *skip_layer_normalization_ruleset.rules]))
