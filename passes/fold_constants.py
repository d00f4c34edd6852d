"""fold-constants: onnxscript's constant folder, one node's failure leaving that node as it was.

The folder evaluates every node whose inputs are constant with the ONNX reference implementation; an evaluator
bug on one node (onnxscript 0.7.2 reads ``split.ndim`` of a SplitToSequence whose scalar ``split`` has no value)
raised out of the pass and aborted the whole compile. Folding is an optimization: a node it cannot fold still
runs. Here such a node keeps its inputs and stays in the graph, and the pass's record counts it with the error.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from ..errors import first_line

MAX_LISTED = 5


class TolerantFoldConstants(FoldConstantsPass):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stats: dict = {"nodes_not_folded": 0, "not_folded": []}

    def process_node(self, node: ir.Node, is_function: bool):
        try:
            return super().process_node(node, is_function)
        except Exception as exc:  # noqa: BLE001 - an evaluator's bug: leave the node, count it, fold the rest
            self.stats["nodes_not_folded"] += 1
            if len(self.stats["not_folded"]) < MAX_LISTED:
                cause = exc.__cause__ or exc
                self.stats["not_folded"].append({"node": node.name, "op": f"{node.domain or 'ai.onnx'}::{node.op_type}",
                                                 "error": f"{type(cause).__name__}: {first_line(cause, 200)}"})
            return None


def fold_constants() -> TolerantFoldConstants:
    # onnxscript's folder, not ours: it evaluates with the ONNX reference implementation and already
    # knows the shape-arithmetic patterns torch.onnx emits.
    return TolerantFoldConstants(shape_inference=False, input_size_limit=1 << 16, output_size_limit=1 << 20)
