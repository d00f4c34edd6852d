"""Run an ordered list of passes and record what each did: the compile report's per-pass section."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import onnx_ir as ir


@dataclass(frozen=True)
class PassStep:
    """One named entry of a pipeline. ``make`` builds a fresh pass so no state leaks between compiles."""

    name: str
    make: Callable[[], ir.passes.PassBase]
    why: str


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def run_passes(model: ir.Model, steps: list[PassStep], on_pass: Callable[[str], None] | None = None):
    """Apply ``steps`` in order; return the model and one record per pass (time, modified, node counts)."""
    records = []
    for step in steps:
        if on_pass is not None:
            on_pass(step.name)
        before = count_nodes(model)
        start = time.perf_counter()
        result = step.make()(model)
        seconds = time.perf_counter() - start
        model = result.model
        after = count_nodes(model)
        records.append({
            "name": step.name, "seconds": round(seconds, 4), "modified": bool(result.modified),
            "nodes_before": before, "nodes_after": after,
        })
    return model, records
