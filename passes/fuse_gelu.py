"""GELU variants -> Gelu / FastGelu.

The erf form (0.5 * x * (1 + erf(x / sqrt 2))) and the tanh approximation (GPT-2's "gelu_new") are
decomposed by the exporter into 5-9 elementwise nodes; each becomes one op. Rules from onnxscript, applied
with commute=True: the exporter writes Mul(add, 0.5) where the rule says Mul(0.5, add), and operand
order must not decide whether a GELU is fused.
"""

from __future__ import annotations

import functools
import math

from onnxscript.rewriter import RewriteRuleSet, pattern
from onnxscript.rewriter.ort_fusions.erfgelu import rules as erf_gelu_rules
from onnxscript.rewriter.ort_fusions.gelu import gelu_rules

from .rule_pass import RulePass


class HalfXTanhGelu(pattern.RewriteRuleClassBase):
    """(0.5 * x) * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) -> FastGelu.

    Why luffy's own: this is how transformers' NewGELUActivation (GPT-2's "gelu_new") exports, and
    onnxscript's tanh rule is written for x * (0.5 * (1 + tanh(...))): commuting operands does not turn one
    association into the other.
    """

    def pattern(self, op, x):
        inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715)), math.sqrt(2.0 / math.pi))
        return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))

    def rewrite(self, op, x):
        return op.FastGelu(x, _domain="com.microsoft")


# Built once per process: commuting a rule set copies every pattern per operand order (most of a small
# graph's compile time), and the rules hold no state between applications; each compile gets a fresh RulePass.
@functools.cache
def _gelu_rules() -> RewriteRuleSet:
    return RewriteRuleSet([*erf_gelu_rules.rules, *gelu_rules.rules, HalfXTanhGelu.rule()], commute=True)


def fuse_gelu() -> RulePass:
    return RulePass(_gelu_rules())
