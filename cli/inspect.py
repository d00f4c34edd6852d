"""`luffy inspect`: an artifact's manifest, ops and parameters, or a model source, as tables or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .console import out, quiet_libraries


def inspect_cmd(
    target: str = typer.Argument(..., help="Artifact directory, .onnx file, zoo name or Hugging Face directory."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
):
    """Summarize an artifact (manifest, op histogram, parameters) or a model source.

    Example: luffy inspect build/llama-tiny --json
    """
    from ..compiler.report.inspect import inspect_path

    if not (Path(target) / "manifest.json").is_file():
        quiet_libraries()
    info = inspect_path(target)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=f"luffy inspect {target}", show_header=False)
    for key, value in info.items():
        if key in ("op_histogram", "io", "auto"):
            continue
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    out.print(table)
    if info.get("io"):
        io = Table(title="I/O")
        for col in ("", "name", "dtype", "shape"):
            io.add_column(col)
        for direction in ("inputs", "outputs"):
            for v in info["io"][direction]:
                io.add_row(direction[:-1], v["name"], v["dtype"], str(v["shape"]))
        out.print(io)
    if info.get("auto"):
        try:
            out.print(auto_table(info["auto"]))
        except (KeyError, TypeError, ValueError, AttributeError):  # the report is informational: say so, go on
            out.print("--auto: report['auto'] is not in the form this luffy writes; see --json")
    if info.get("op_histogram"):
        ops = Table(title="ops")
        ops.add_column("op")
        ops.add_column("count", justify="right")
        for op, count in info["op_histogram"].items():
            ops.add_row(op, str(count))
        out.print(ops)


def auto_table(auto: dict) -> Table:
    """report["auto"] as a table: one row per candidate measured, the chosen one marked, what was skipped."""
    table = Table(title=f"--auto: the fastest within {auto['max_quality_loss_pct']:g}% quality loss",
                  caption="; ".join(filter(None, [f"chosen: {auto['chosen']}", auto["choice_rule"], (
                      f"skipped: {', '.join(s['name'] for s in auto['skipped'])} ({auto['skipped'][0]['reason']})"
                      if auto["skipped"] else "")])))
    for col in ("candidate", "loss %", "decode tok/s", "prefill ms", "MB", "in budget"):
        table.add_column(col, justify="left" if col == "candidate" else "right", no_wrap=col == "candidate")
    for c in auto["candidates"]:
        def num(value, fmt):
            return "—" if value is None else format(value, fmt)

        table.add_row(("▶ " if c["name"] == auto["chosen"] else "  ") + c["name"], num(c["quality_loss_pct"], "+.3f"),
                      num(c["decode_tokens_per_s"], ".0f"), num(c["prefill_ms"], ".1f"),
                      num(None if c["size_bytes"] is None else c["size_bytes"] / 1e6, ".2f"),
                      c.get("error") or ("yes" if c["within_budget"] else "no"))
    return table
