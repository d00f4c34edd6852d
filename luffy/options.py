"""An option declared once: a dataclass field whose metadata is also its command-line flag.

`luffy compile`'s options (compiler/config.py LuffyConfig) and `luffy serve`'s (serving/options.py) are such
fields; the CLI builds its flags, defaults and --help from them, and the Ray Serve builder and its YAML
config read the same fields by key, so adding an option is one field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field


def option(default, help: str, *flags: str, group: str | None = None, key: str | None = None, **cli):
    """A dataclass field that is also a flag.

    ``flags`` default to ``--key`` (``key`` defaults to the field's name: the name a mapping of options, such
    as a Ray Serve config's ``args``, uses); ``group`` sorts it into a section of --help (and, for compile,
    of the manifest); ``cli`` goes to typer.Option (min, max, metavar, envvar).

    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Options:
    ...     port: int = option(8000, "Port to bind.", min=0)
    >>> dataclasses.fields(Options)[0].metadata["help"]
    'Port to bind.'
    """
    return field(default=default, metadata={"help": help, "flags": flags, "group": group, "key": key, "cli": cli})


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` declared with ``option``, in order."""
    return [f for f in dataclasses.fields(cls) if "flags" in f.metadata]


def option_key(f: dataclasses.Field) -> str:
    """The name an option goes by outside its dataclass (a mapping's key, the CLI parameter)."""
    return f.metadata.get("key") or f.name


def option_flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flags"] or ("--" + option_key(f).replace("_", "-"),)
