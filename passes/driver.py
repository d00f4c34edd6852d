"""Run an ordered list of passes and record what each did: the compile report's per-pass section."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import onnx_ir as ir

from ..errors import LuffyError, UnsupportedModelError, first_line


@dataclass(frozen=True)
class PassStep:
    """One named entry of a pipeline. ``make`` builds a fresh pass so no state leaks between compiles."""

    name: str
    make: Callable[[], ir.passes.PassBase]
    why: str


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def initializer_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers that have values (lazy ones counted by their shape and dtype)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def run_passes(
    model: ir.Model,
    steps: list[PassStep],
    on_pass: Callable[[str], None] | None = None,
    after_pass: Callable[[str, ir.Model], dict | None] | None = None,
):
    """Apply ``steps`` in order; return the model and one record per pass (time, modified, node counts).

    ``after_pass(name, model)`` runs after each pass (the compiler's --verify and --dump-ir live there, so
    this package never imports the compiler); a dict it returns is merged into that pass's record.
    """
    records = []
    for step in steps:
        if on_pass is not None:
            on_pass(step.name)
        before = count_nodes(model)
        start = time.perf_counter()
        pass_ = step.make()
        try:
            result = pass_(model)
        except LuffyError:
            raise
        except Exception as exc:  # an upstream rewriter's crash: name the pass and the way around it
            reason = type(exc).__name__ + (f": {first_line(exc, 200)}" if str(exc).strip() else "")
            raise UnsupportedModelError(f"pass {step.name!r} failed ({reason}); --disable-pass {step.name} "
                                        "skips it") from exc
        seconds = time.perf_counter() - start
        model = result.model
        after = count_nodes(model)
        record = {
            "name": step.name, "seconds": round(seconds, 4), "modified": bool(result.modified),
            "nodes_before": before, "nodes_after": after,
            **getattr(pass_, "stats", {}),  # rule passes: match counts, and why a rule did not match
        }
        if after_pass is not None:
            record.update(after_pass(step.name, model) or {})
        records.append(record)
    return model, records
