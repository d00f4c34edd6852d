"""`luffy zoo`: the built-in models."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from .console import out


def zoo_cmd(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the built-in models (no download needed).

    Example: luffy zoo
    """
    from ..models_zoo import ZOO

    if as_json:
        print(json.dumps([{"name": e.name, "kind": e.kind, "description": e.description} for e in ZOO.values()], indent=2))
        return
    table = Table(title="luffy zoo")
    for col in ("name", "kind", "description"):
        table.add_column(col)
    for e in ZOO.values():
        table.add_row(e.name, e.kind, e.description)
    out.print(table)
