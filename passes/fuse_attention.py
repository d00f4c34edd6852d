"""Attention -> com.microsoft MultiHeadAttention.

Two steps, as onnxscript structures it:
  fuse-sdpa       MatMul(q, kT) * scale + mask -> Softmax -> MatMul(., v) is recognised as one
                  scaled-dot-product-attention node (an intermediate op of the rewriter's own domain);
  fuse-mha        that node, with the surrounding head reshapes, transposes and the past-KV concat,
                  becomes MultiHeadAttention;
  lower-sdpa      an SDPA whose surroundings did not match is lowered to MultiHeadAttention on its
                  own, so no intermediate op survives. It must run after fuse-mha: both start at the
                  SDPA node, and the smaller rewrite would otherwise win.
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet, pattern
from onnxscript.rewriter.ort_fusions.mha import MultiHeadAttention
from onnxscript.rewriter.ort_fusions.sdpa import sdpa_rules
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import _rules as sdpa_via_mha_rules

from .rule_pass import RulePass


def fuse_sdpa() -> RulePass:
    return RulePass(sdpa_rules, shape_inference=True)


class _SameRankMHA(MultiHeadAttention):
    """onnxscript's MHA rule, refusing when the attention output was reshaped to anything but [B, S, D].

    Why luffy's own: the rule replaces the final Reshape's output with MultiHeadAttention's [B, S, D]
    output without checking that Reshape's target. GPT-2 (Conv1D) reshapes attention straight to
    [B*S, D] for a Gemm, and the upstream rewrite hands that Gemm a rank-3 tensor: an invalid model.
    """

    def check(self, op, query_BSD, attention_reshaped=None, **kwargs):
        shape = attention_reshaped.shape if attention_reshaped is not None else None
        if shape is None or query_BSD.shape is None or len(shape) != len(query_BSD.shape):
            return pattern.MatchResult().fail(
                f"attention output is reshaped to {shape}, not to the query's rank-3 [B, S, D]", attention_reshaped
            )
        return super().check(op, query_BSD=query_BSD, **kwargs)


def _mha_rules(has_past: bool) -> list:
    return [
        _SameRankMHA.rule(
            f"MHA{'_Rotary' if rotary else ''}{'_Past' if has_past else ''}",
            is_rotary=rotary, has_past_present=has_past, is_cross_attention=False,
        )
        for rotary in (False, True)
    ]


def fuse_mha() -> RulePass:
    # Rules with past first: a decoder step graph's attention always has a past concat to absorb.
    return RulePass(RewriteRuleSet([*_mha_rules(has_past=True), *_mha_rules(has_past=False)]))


def lower_sdpa() -> RulePass:
    return RulePass(sdpa_via_mha_rules)
