"""RulePass: run one set of onnxscript rewrite rules as a named pass, and say what happened.

Every fusion in luffy is a RulePass, so the compile report gets, for each one, how many times it fired
and, when it never fired, the rule that came closest and why it refused (onnxscript's MatchingTracer).
That is what makes "the pattern did not match" debuggable from the report alone.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

MAX_REASONS = 3


class RulePass(ir.passes.InPlacePass):
    """Apply ``rules`` once over the model; ``stats`` holds the match count (and reasons when zero).

    A rule whose check or rewrite function raises on one node leaves that node as it was (the graph only
    changes after a rule returns its replacement) and is counted in ``stats["rewrites_failed"]``: one odd node
    never aborts a compile that every other node of the graph would survive.
    """

    def __init__(self, rules: RewriteRuleSet, *, shape_inference: bool = False):
        super().__init__()
        self.rules = rules
        self.shape_inference = shape_inference
        self.stats: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        failures: list[dict] = []
        rules = RewriteRuleSet([_Tolerant(rule, failures) for rule in self.rules.rules])
        count = rules.apply_to_model(model)
        if count and self.shape_inference:
            # Later patterns check shapes of values this rewrite created.
            common.ShapeInferencePass()(model)
        self.stats = {"matches": count}
        if count == 0:
            self.stats["not_matched"] = explain_no_match(rules, model)
        if failures:
            self.stats["rewrites_failed"] = len(failures)
            self.stats["failed"] = failures[:MAX_REASONS]
        return ir.passes.PassResult(model, modified=count > 0)


class _Tolerant:
    """A rule as the rule set sees it, whose try_rewrite reports an exception instead of raising it."""

    def __init__(self, rule, failures: list[dict]):
        self._rule, self._failures = rule, failures

    def __getattr__(self, name):
        return getattr(self._rule, name)

    def try_rewrite(self, model, graph_or_function, node, **kwargs):
        try:
            return self._rule.try_rewrite(model, graph_or_function, node, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a rule's bug on one node: that node stays as it was
            self._failures.append({"rule": self._rule.name or type(self._rule).__name__, "node": node.name,
                                   "error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"})
            return None


def explain_no_match(rules: RewriteRuleSet, model: ir.Model) -> list[dict]:
    """For each rule, the furthest partial match and its failure reason (empty: nothing even started)."""
    tracer = MatchingTracer()
    rules.apply_to_model(model, tracer=tracer)
    reasons = []
    for rule, matches in tracer.best_matches_map.items():
        if not matches or matches[0].status == MatchStatus.SUCCESS:
            continue
        best = matches[0]
        reasons.append({
            "rule": rule.name or type(rule).__name__,
            "status": best.status.name.lower(),
            "matched_nodes": len(best.match_result.nodes),
            "at_node": best.root_node.name,
            "reason": (best.match_result.reason or "")[:200],
        })
    reasons.sort(key=lambda r: -r["matched_nodes"])
    if not reasons:  # e.g. fuse-mha after fuse-gqa took every attention
        return [{"rule": "*", "status": "no_match", "matched_nodes": 0, "at_node": "",
                 "reason": "no node in the graph starts any of these patterns"}]
    return reasons[:MAX_REASONS]
