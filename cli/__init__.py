"""The `luffy` command: a thin typer layer over the Python API (nothing is reachable only from here)."""
