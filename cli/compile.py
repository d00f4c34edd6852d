"""`luffy compile SOURCE -o DIR`: its flags are generated from LuffyConfig's fields (compiler/config.py)."""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path
from typing import List

import typer

from ..compiler.config import LuffyConfig  # plain dataclasses: no torch, no compiler imports
from ..extras import import_compiler
from ..options import option_fields
from .console import err, progress_line, quiet_libraries
from .flags import flag_parameter
from .inspect import auto_table


def compile_cmd(source: str, output: Path, report_json: bool, **options):
    """Compile a model into an artifact directory.

    Example: luffy compile ./my-llama -o build/my-llama --target ort -O2

    Example (int4 by GPTQ, perplexity before/after): luffy compile llama-pydoc -o build/q4 --precision int4
    --calib calib.txt --eval heldout.txt

    Example (TensorRT, compiled on a CPU CI job, built on the GPU machine): luffy compile ./my-llama -o build/trt
    --target trt --precision fp16 --defer-build; then there: luffy build build/trt
    """
    compile_artifact = import_compiler("luffy.auto").compile
    quiet_libraries()
    with progress_line(f"compiling {source}", bar=True) as say:
        artifact = compile_artifact(source, output=output, progress=say, **options)
    report = artifact.report
    if report_json:
        print(json.dumps(report, indent=2))
        return
    parity = report.get("parity")
    parity_text = f"max |Δ| {parity['max_abs_diff']:.2e} vs PyTorch" if parity else "not checked"
    err.print(
        f"[green]✓[/green] {output}  {report['capture']['nodes']} → {report['nodes']} nodes, "
        f"{report['parameters']:,} parameters, {report['seconds_total']:.1f}s, parity {parity_text}", soft_wrap=True,
    )
    if artifact.manifest.get("state") == "needs-build":
        err.print(f"  needs-build: TensorRT engine not built here; on the GPU machine run: luffy build {output}",
                  soft_wrap=True)
    if report.get("kv_cache"):
        kv = report["kv_cache"]
        err.print(f"  KV cache {kv['dtype']}: {kv['bytes_per_token']:,} bytes per token"
                  + ("" if kv["multi_row_steps"] else "; multi-token steps with a cache take one row each"),
                  soft_wrap=True)
    if report.get("auto"):
        err.print(auto_table(report["auto"]))
    quality = report.get("quality")
    if quality:
        ref = quality["perplexity_reference"]
        change = f" ({quality['perplexity_increase_pct']:+.2f}% vs {ref:.4f} {quality['reference']})" if ref else ""
        err.print(f"  perplexity {quality['perplexity']:.4f}{change} on {quality['tokens_scored']:,} tokens", soft_wrap=True)


def _compile_parameters() -> list[inspect.Parameter]:
    """compile_cmd's signature: SOURCE, -o, --json, then one flag per LuffyConfig option field (in field order;
    compiler/config.py `option` is where an option is added, not here)."""
    fixed = [
        ("source", str, typer.Argument(..., help="Zoo name, local Hugging Face directory, .onnx file or "
                                                 "package.module:factory.")),
        ("output", Path, typer.Option(..., "-o", "--output", help="Artifact directory to write (replaced atomically).")),
        ("report_json", bool, typer.Option(False, "--json", help="Print the compile report as JSON on stdout.")),
    ]
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
              for name, kind, default in fixed]
    hints = typing.get_type_hints(LuffyConfig)
    panels = {"trt": "TensorRT", "auto": "Auto"}
    for f in option_fields(LuffyConfig):
        kind = List[str] if f.name.endswith("_passes") else hints[f.name]
        params.append(flag_parameter(f, kind, panels.get(f.metadata["group"])))
    return params


compile_cmd.__signature__ = inspect.Signature(_compile_parameters())
