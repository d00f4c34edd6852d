"""The pipelines: one explicit ordered list per target and opt level, readable top to bottom.

    -O0  nothing: the captured graph as exported
    -O1  cleanup: folding, dead code, duplicate weights
    -O2  -O1 + fusions (the default)
    -O3  -O2 + every safe rewrite, layout changes included

Fusion and attention passes join the -O2/-O3 lists as they land; each entry says why it sits where it does.
"""

from __future__ import annotations

from onnx_ir.passes import common

from ..errors import UsageError
from .driver import PassStep

TARGETS = ("ort", "trt")
OPT_LEVELS = (0, 1, 2, 3)


def _fold_constants():
    from onnxscript.optimizer._constant_folding import FoldConstantsPass

    # onnxscript's folder, not ours: it evaluates with the ONNX reference implementation and already
    # knows the shape-arithmetic patterns torch.onnx emits.
    return FoldConstantsPass(shape_inference=False, input_size_limit=1 << 16, output_size_limit=1 << 20)


CLEANUP = [
    # Functions first, so every later pass sees plain nodes.
    PassStep("inline", common.InlinePass, "later passes match plain nodes, not function calls"),
    PassStep("fold-constants", _fold_constants, "turns shape arithmetic on static dims into constants"),
    PassStep("eliminate-identity", common.IdentityEliminationPass, "Identity nodes hide patterns from fusions"),
    # Tied weights (embedding / lm_head) and repeated constants are stored once; before CSE, so nodes that
    # read two copies of one weight become identical and CSE merges them.
    PassStep("dedupe-initializers", lambda: common.DeduplicateInitializersPass(size_limit=1 << 30),
             "identical weights stored once"),
    PassStep("cse", common.CommonSubexpressionEliminationPass, "merges repeated shape/mask computations"),
    # Dead-code removal after everything that can orphan nodes.
    PassStep("remove-unused", common.RemoveUnusedNodesPass, "drops nodes and initializers nothing reads"),
    PassStep("remove-unused-opsets", common.RemoveUnusedOpsetsPass, "keeps the opset imports honest"),
    PassStep("topological-sort", common.TopologicalSortPass, "a canonical node order for stable artifacts"),
]

PIPELINES: dict[tuple[str, int], list[PassStep]] = {
    ("ort", 0): [],
    ("ort", 1): CLEANUP,
    ("ort", 2): CLEANUP,
    ("ort", 3): CLEANUP,
    ("trt", 0): [],
    ("trt", 1): CLEANUP,
    ("trt", 2): CLEANUP,
    ("trt", 3): CLEANUP,
}


def all_pass_names() -> list[str]:
    names: list[str] = []
    for steps in PIPELINES.values():
        names += [s.name for s in steps if s.name not in names]
    return names


def pipeline(target: str, opt_level: int, disabled=(), enabled=()) -> list[PassStep]:
    """The ordered passes for ``target`` at ``opt_level``, minus ``disabled``, plus ``enabled`` ones from -O3.

    >>> [s.name for s in pipeline("ort", 1, disabled=["cse"])][:3]
    ['inline', 'fold-constants', 'eliminate-identity']
    """
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if opt_level not in OPT_LEVELS:
        raise UsageError(f"opt level {opt_level!r} is out of range; choose 0, 1, 2 or 3")
    known = all_pass_names()
    for name in (*disabled, *enabled):
        if name not in known:
            raise UsageError(f"unknown pass {name!r}; known passes: {', '.join(known)}")
    chosen = {s.name for s in PIPELINES[(target, opt_level)]} | set(enabled)
    chosen -= set(disabled)
    # Keep the -O3 order for everything chosen, so enabling a pass never changes where it runs.
    return [s for s in PIPELINES[(target, 3)] if s.name in chosen]
