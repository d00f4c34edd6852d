"""The `luffy` command: a thin typer layer over the Python API (nothing is reachable only from here).

main.py builds the app and is the entry point; each command is one module (compile, run, serve, build,
verify, inspect, zoo, bench); console.py holds what they print through.
"""
