"""`luffy compile | run | serve | build | verify | inspect | zoo | bench`: the app, and its entry point.

One module per command (cli/compile.py, run.py, ...); this module registers them in --help's order and turns
errors into one line. Errors print one line naming the cause and exit with the error kind's code (see
luffy.errors); add --debug (or LUFFY_DEBUG=1) for the traceback.
"""

from __future__ import annotations

import os
import signal
import sys

import typer

from .. import __version__
from ..errors import LuffyError
from .bench import bench_cmd, bench_serve_cmd
from .build import build_cmd
from .compile import compile_cmd
from .console import err, out
from .inspect import inspect_cmd
from .run import run_cmd
from .serve import serve_cmd
from .verify import verify_cmd
from .zoo import zoo_cmd

_state = {"debug": bool(os.environ.get("LUFFY_DEBUG"))}

# (name, command, typer settings), in --help's order
COMMANDS = (
    ("compile", compile_cmd, {}),
    ("run", run_cmd, {}),
    ("serve", serve_cmd, {}),
    ("build", build_cmd, {}),
    ("verify", verify_cmd, {}),
    ("inspect", inspect_cmd, {}),
    ("zoo", zoo_cmd, {}),
    ("bench", bench_cmd, {}),
    ("bench-serve", bench_serve_cmd, {"hidden": True}),  # reached as `luffy bench serve` (see main)
)


def _version(value: bool):
    if value:
        out.print(f"luffy {__version__}")
        raise typer.Exit()


def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    _state["debug"] = _state["debug"] or debug


def _app() -> typer.Typer:
    """The typer app: the global options (--debug, --version), then every command in --help's order."""
    app = typer.Typer(
        name="luffy",
        help="Ahead-of-time compiler for LLM inference.\n\nExample: luffy compile llama-tiny -o build/llama-tiny && "
        "luffy run build/llama-tiny --prompt 'Hello'",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_main)
    for name, command, settings in COMMANDS:
        app.command(name, **settings)(command)
    return app


app = _app()


def _is_usage_error(exc: BaseException) -> bool:
    # click's ClickException, or the copy typer >= 0.29 vendors as typer._click: matched by what they do
    # (an exit code and show()), not by class, so a typer release that moves the class again changes nothing.
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "show", None))


class _Signals:
    """SIGINT and SIGTERM become exceptions inside the command, so staged writes clean up (their ``finally``
    runs) and the CLI reports the signal itself, whatever the CLI library does with a KeyboardInterrupt."""

    def __init__(self):
        self.received: int | None = None

    def __enter__(self):
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. nohup, or a shell's background job: keep ignoring
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum
        raise KeyboardInterrupt

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _error_line(message: str) -> None:
    err.print(f"luffy: error: {message}", markup=False, highlight=False, soft_wrap=True)


def command_argv(argv: list[str]) -> list[str]:
    """``luffy ARGV`` as the app parses it: `luffy bench serve` is its own command (bench's first argument is a
    path, so the app could not tell them apart)."""
    return ["bench-serve", *argv[2:]] if argv[:2] == ["bench", "serve"] else list(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; a LuffyError becomes one line on stderr and its exit code, a usage error
    click's message and 2, Ctrl-C one line and 130 (SIGTERM: 143)."""
    argv = command_argv(sys.argv[1:] if argv is None else argv)
    with _Signals() as signals:
        try:
            result = app(args=argv, standalone_mode=False)
        except LuffyError as exc:
            if _state["debug"]:
                raise
            _error_line(str(exc))
            return exc.exit_code
        except (typer.Exit, typer.Abort, KeyboardInterrupt) as exc:
            result = getattr(exc, "exit_code", 1 if signals.received is None else 0)
        except Exception as exc:  # noqa: BLE001 - usage errors and anything unexpected
            if _is_usage_error(exc) and signals.received is None:
                exc.show()
                return exc.exit_code
            if _state["debug"]:
                raise
            if signals.received is None:
                _error_line(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
                return 1
            result = 1
    if signals.received is not None:
        name = "interrupted (Ctrl-C)" if signals.received == signal.SIGINT else "terminated (SIGTERM)"
        _error_line(name)
        return 128 + signals.received
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
