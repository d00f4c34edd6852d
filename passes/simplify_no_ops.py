"""Remove operations that do nothing: x*1, x/1, x+0, x-0, same-type Cast, identity Expand/Transpose,
dropout at inference, and merge back-to-back Reshape/Transpose/Unsqueeze pairs.

Exporters leave these behind (transformers multiplies rotary tables by an attention_scaling that is 1.0
for plain RoPE), and each one breaks a fusion pattern that expects its neighbours to be adjacent: the
cos/sin-cache rule does not match Llama's rotary until `cos * 1.0` is gone. Rules from onnxscript, each
checking shapes so a broadcast (x + zeros of a larger shape) is never dropped.
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules import common as rules

from .rule_pass import RulePass

NO_OP_RULES = [
    rules.mul_by_1_rule, rules.div_by_1_rule, rules.add_0_rule, rules.sub_0_rule,
    rules.no_op_cast_rule, rules.no_op_expand_rule, rules.no_op_transpose_rule,
    rules.dropout_inference_rule, rules.dropout_zero_rule,
    rules.transpose_transpose_rule, rules.unsqueeze_unsqueeze_rule, rules.reshape_reshape_rule,
]


def simplify_no_ops() -> RulePass:
    return RulePass(RewriteRuleSet(NO_OP_RULES))
