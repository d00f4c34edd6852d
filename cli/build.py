"""`luffy build ARTIFACT`: build a deferred TensorRT engine on the GPU machine that will run it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .console import err, progress_line


def build_cmd(
    artifact: Path = typer.Argument(..., help="A --target trt artifact in state needs-build (compile --defer-build)."),
    timing_cache: Optional[Path] = typer.Option(
        None, "--timing-cache", metavar="FILE", help="Persistent timing cache, safe to share between concurrent builds "
        "[the one given at compile, else ~/.cache/luffy/trt-timing.cache].",
    ),
):
    """Build the TensorRT engine of a deferred artifact, on the GPU machine that will run it.

    Checks the graph against the installed TensorRT's ONNX parser first, builds with the artifact's
    profiles, and records TensorRT, CUDA, GPU and compute capability in the manifest; the artifact is
    replaced only when the engine is written.

    Example: luffy compile ./my-llama -o build/trt --target trt --defer-build   (CPU CI job)
    then:    luffy build build/trt                                               (GPU job)
    """
    from ..compiler.targets.trt_build import build_artifact

    with progress_line(f"building {artifact}") as say:
        manifest = build_artifact(artifact, timing_cache, say=say)
    build = manifest["tensorrt"]["build"]
    err.print(f"[green]✓[/green] {artifact}  TensorRT {build['tensorrt']} engine for {build['gpu']} "
              f"(sm {build['compute_capability']}), {build['seconds']:.1f}s")
