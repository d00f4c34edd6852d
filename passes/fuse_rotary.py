"""Rotary position embedding (full and partial) -> com.microsoft RotaryEmbedding with constant caches.

Two rule sets in sequence, as one pass because only both together rewrite anything: onnxscript's rotary
rules recognise the rotate-half form (Slice/Neg/Concat/Mul/Add per q and k; partial rotary too) as an
intermediate RotaryEmbedding(x, cos, sin); its cos/sin-cache rules then turn cos/sin computed from
position ids and a constant inverse-frequency vector into constant tables indexed by position_ids, giving
ORT's op. An intermediate node whose cos/sin could not be cached is inlined back to the original
subgraph by the pipeline, so ``matches`` counts only rotaries that really became ORT ops.
"""

from __future__ import annotations

import functools

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet, _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.cos_sin_cache import CosSinCacheFusion, cos_sin_cache_rules
from onnxscript.rewriter.ort_fusions.rotary_embedding import partial_embedding_rules, rotary_embedding_rules

from .rule_pass import explain_no_match

_ROTATE_HALF = RewriteRuleSet([*rotary_embedding_rules.rules, *partial_embedding_rules.rules])
MAX_SEQ_LEN_KEY = "luffy.max_seq_len"  # model metadata the compiler sets: how many positions the caches cover


class OuterProductCosSin(CosSinCacheFusion):
    """cos/sin as transformers 5 exports them: freqs = float(position_ids[..., None]) * inv_freq.

    Why luffy's own: onnxscript's rule expects the transformers 4 form, inv_freq[None, :, None] @
    position_ids[:, None, :] then a Transpose. In transformers 5 the batch-expanded matmul with an inner
    dimension of 1 is folded by the exporter into this broadcast Mul, which that rule never matches. The
    rewrite (constant cos/sin tables indexed by position_ids) is onnxscript's, inherited.
    """

    def __init__(self, name: str, max_pos_id: int | None = None):
        super().__init__(name)
        self._max_pos_id = max_pos_id

    def pattern(self, op, x, inv_freq, position_ids, interleaved, num_heads, freqs, dtype, extra_dims):
        positions = op.Cast(op.Unsqueeze(position_ids, extra_dims), to=ir.DataType.FLOAT)  # [B, S, 1]
        freqs = op.Mul(positions, inv_freq)  # [B, S, E]
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), [1])
        sin = op.Unsqueeze(op.Sin(emb), [1])
        return op.RotaryEmbedding(
            x, cos, sin, interleaved=interleaved, num_heads=num_heads, _domain="ai.onnxruntime._fusion"
        )

    def check(self, context, inv_freq, position_ids, extra_dims, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not (_ir_utils.has_rank(position_ids, 2) and _ir_utils.is_1d_value(extra_dims, [2])):
            return result.fail("position_ids is not [batch, seq] unsqueezed on its last axis", position_ids)
        if inv_freq.const_value is None or inv_freq.const_value.numpy().ndim != 1:
            return result.fail("inv_freq is not a constant vector", inv_freq)
        if self.max_pos_id is None:
            return result.fail(f"model metadata has no {MAX_SEQ_LEN_KEY}: the cache length is unknown", inv_freq)
        return result


@functools.cache  # per cache length: commuting the rules is most of a small graph's compile time
def _cos_sin_rules(max_seq_len: int | None) -> RewriteRuleSet:
    # positions 0 .. max_seq_len - 1
    max_pos_id = max_seq_len - 1 if max_seq_len is not None else None
    luffy_rule = OuterProductCosSin.rule("CosSinCache_outer_product", max_pos_id=max_pos_id)
    return RewriteRuleSet([*cos_sin_cache_rules.rules, luffy_rule], commute=True)


class FuseRotary(ir.passes.InPlacePass):
    def __init__(self):
        super().__init__()
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        recognised = _ROTATE_HALF.apply_to_model(model)
        max_seq_len = model.metadata_props.get(MAX_SEQ_LEN_KEY)
        cache_rules = _cos_sin_rules(int(max_seq_len) if max_seq_len else None)
        cached = cache_rules.apply_to_model(model) if recognised else 0
        self.stats = {"matches": cached, "rotate_half_recognised": recognised}
        if not cached:
            why = explain_no_match(cache_rules, model) if recognised else explain_no_match(_ROTATE_HALF, model)
            self.stats["not_matched"] = why
        return ir.passes.PassResult(model, modified=recognised > 0)


def fuse_rotary() -> FuseRotary:
    return FuseRotary()
