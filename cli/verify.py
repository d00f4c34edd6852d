"""`luffy verify ARTIFACT`: is this artifact intact and usable here (hashes, runtime, load, smoke run, parity)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .console import out, progress_line, quiet_libraries


def verify_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory to check."),
    parity: Optional[str] = typer.Option(None, "--parity", metavar="SOURCE", help="Also rerun the parity check "
                                         "against this source (the zoo name, HF directory or factory it was compiled from)."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
):
    """Check an artifact before trusting it: file hashes, runtime compatibility, load, a smoke run.

    Each check is one line; the first failure is one line and exit code 6.

    Example: luffy verify build/pydoc --parity llama-pydoc
    """
    from ..compiler.quality.artifact_check import verify_artifact

    if parity is not None:
        quiet_libraries()
    with progress_line(f"verifying {artifact}") as say:
        result = verify_artifact(artifact, parity, say=say)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for item in result["checks"]:
        out.print(f"[green]✓[/green] {item['check']}: {item['detail']} ({item['seconds']:.2f}s)", highlight=False,
                  soft_wrap=True)
