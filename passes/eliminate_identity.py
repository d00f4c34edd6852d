"""Identity elimination that never loses a graph output.

Identity nodes hide patterns from fusions, so they go; onnx_ir's pass does the work, with one case kept.
"""

from __future__ import annotations

from onnx_ir.passes import common


class EliminateIdentity(common.IdentityEliminationPass):
    """onnx_ir's IdentityEliminationPass, except that ``y = Identity(x)`` stays when x and y are both graph outputs.

    Upstream (onnx_ir 1.1, unchanged on ir-py main) removes such a node by renaming x to y and pointing y's
    output slot at x, so one value is listed twice under y's name: a top-level output name disappears, and in a
    Scan body ORT reads garbage for the lost output (ONNX node tests test_scan_sum, test_scan9_*). Removing the
    node would need a second value anyway, so keeping it costs nothing. tests/test_semantics_suite.py covers
    this (the Scan cases fail if the override stops being called).
    """

    def _try_eliminate_identity_node(self, node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 and len(node.outputs) == 1:
            source = node.inputs[0]
            if source is not None and source.is_graph_output() and node.outputs[0].is_graph_output():
                return False
        return super()._try_eliminate_identity_node(node)
