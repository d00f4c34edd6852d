"""GELU variants -> Gelu / FastGelu.

The erf form (0.5 * x * (1 + erf(x / sqrt 2))) and the tanh approximation (GPT-2's "gelu_new") are
decomposed by the exporter into 5-9 elementwise nodes; each becomes one op. Rules from onnxscript, applied
with commute=True: the exporter writes Mul(add, 0.5) where the rule says Mul(0.5, add), and operand
order must not decide whether a GELU is fused.
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.ort_fusions.erfgelu import rules as erf_gelu_rules
from onnxscript.rewriter.ort_fusions.gelu import gelu_rules

from .rule_pass import RulePass


def fuse_gelu() -> RulePass:
    return RulePass(RewriteRuleSet([*erf_gelu_rules.rules, *gelu_rules.rules], commute=True))
