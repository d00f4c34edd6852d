"""Command-line flags generated from option fields (luffy/options.py): `luffy compile`'s and `luffy serve`'s."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import typer

from ..options import option_flags, option_key


def flag_parameter(f: dataclasses.Field, kind, panel: str | None = None) -> inspect.Parameter:
    """The keyword parameter of a typer command for option field ``f`` of type ``kind``: its flags, default, help
    and typer settings from the field, shown in --help's ``panel``."""
    default = list(f.default) if isinstance(f.default, tuple) else f.default
    if typing.get_origin(kind) is tuple:  # a repeatable option
        kind = typing.List[str]
    option = typer.Option(default, *option_flags(f), help=f.metadata["help"], rich_help_panel=panel,
                          **f.metadata["cli"])
    return inspect.Parameter(option_key(f), inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
