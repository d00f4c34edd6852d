"""The documentation's shell commands run, so none goes stale: every ```bash block of README.md and docs/*.md,
page by page, its blocks in order in a scratch directory (luffy.benchmarks.docs_check; ```bash outside-ci
blocks run there, outside CI). Pages other than README start with the quick start's build/pydoc, the session's
llama-pydoc build, so the whole module compiles only what README's quick start compiles.

```sh blocks (installation, a GPU, a Ray cluster) are not run but checked: each `luffy ...` line parses with
the CLI's own parser (a renamed or removed command or option fails), a `serve run IMPORT_PATH k=v ...` line's
keys go through the builder it names, a `python -c` line's code compiles, and README's set-up commands are
the ones .ci/run runs."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import typer

from luffy.benchmarks import docs_check
from luffy.cli import main as cli
from luffy.errors import UsageError
from luffy.serving.options import serve_options

PAGES = docs_check.pages()
RUN_IN_CI = [page for page in PAGES if docs_check.blocks(page, (docs_check.CI,))]
README_MAX_LINES = 250


@pytest.fixture(scope="session")
def quick_start_artifact(zoo_artifacts) -> Path:
    """build/pydoc as README's quick start writes it: llama-pydoc compiled with the default options."""
    return zoo_artifacts("llama-pydoc")[0].path


@pytest.mark.parametrize("page", RUN_IN_CI, ids=[page.name for page in RUN_IN_CI])
def test_every_bash_block_of_the_page_runs(page, tmp_path, quick_start_artifact):
    records = docs_check.check_page(page, tmp_path, quick_start_artifact, (docs_check.CI,))
    errors = [r["error"] for r in records if r["error"]]
    assert not errors, errors[0]
    assert len(records) == len(docs_check.blocks(page, (docs_check.CI,)))


def test_shell_blocks_use_the_convention_and_readme_stays_short():
    fences = [(page.name, info.strip()) for page in PAGES
              for info in re.findall(r"^```(\w[^\n`]*)$", page.read_text(), re.M)]
    misspelt = [f"{name}: ```{info}" for name, info in fences
                if info.startswith("bash") and info not in (docs_check.CI, docs_check.OUTSIDE_CI)]
    assert not misspelt, misspelt
    assert {info for _, info in fences} & {docs_check.CI, docs_check.OUTSIDE_CI}
    assert len((docs_check.REPO / "README.md").read_text().splitlines()) <= README_MAX_LINES


def test_readme_set_up_commands_are_what_ci_runs():
    # the set-up blocks install (```sh, not run by the docs check): CI's own script runs the same commands
    readme = (docs_check.REPO / "README.md").read_text()
    ci = (docs_check.REPO / ".ci" / "run").read_text()
    ci_command = next(line for line in ci.splitlines() if "pip install" in line)
    readme_commands = [m for m in re.findall(r"^```sh\n(.*?)^```", readme, re.M | re.S)]
    assert any(shlex.split(block.strip()) == shlex.split(ci_command.strip()) for block in readme_commands), (
        f".ci/run runs {ci_command!r}; README's set-up blocks are {readme_commands}")


SET_UP = (["python3", "-m", "pip", "install"], ["python3", "-m", "pytest"])  # README's, held to .ci/run above


def _sh_commands() -> list[tuple[str, list[str]]]:
    """("page:line", argv) for every command of the ```sh blocks (``&&`` chains two; ``#`` starts a comment)."""
    found = []
    for page in PAGES:
        for block in docs_check.blocks(page, ("sh",)):
            for offset, line in enumerate(block.text.splitlines(), 1):
                words = shlex.split(line, comments=True)
                while words:
                    end = words.index("&&") if "&&" in words else len(words)
                    found.append((f"{block.page}:{block.line + offset}", words[:end]))
                    words = words[end + 1:]
    return found


def _parse_luffy(argv: list[str]) -> tuple[str, dict]:
    """(command, its parameters) of `luffy ARGV`, parsed by the app's own parser without running anything: a
    renamed or removed command or option, or a value of the wrong type, raises click's UsageError. Paths need
    not exist (no command declares exists=True: the commands check their paths themselves)."""
    group = typer.main.get_command(cli.app)
    parent = group.make_context("luffy", cli.command_argv(argv))  # the global options (--debug)
    name, command, rest = group.resolve_command(parent, [*parent._protected_args, *parent.args])  # as invoke does
    return name, command.make_context(name, rest, parent=parent).params


def _check_sh_command(where: str, argv: list[str]) -> None:
    """One ```sh command, checked without running it (see the module docstring); raises what is stale."""
    if argv[0] == "luffy":
        name, params = _parse_luffy(argv[1:])
        if name == "serve":  # the values too, as serve_cmd reads them (serving/options.py)
            serve_options(params)
    elif argv[0] in ("python", "python3") and argv[1:2] == ["-c"]:
        compile(argv[2], where, "exec")
    elif argv[:2] == ["serve", "run"]:
        pass  # test_sh_serve_run_lines_give_the_builder_keys_it_accepts
    elif not (where.startswith("README.md:") and any(argv[:len(s)] == s for s in SET_UP)):
        raise AssertionError("no test checks this command: check it here, or run it in a ```bash block")


def test_sh_block_commands_parse_against_the_cli():
    """Every ```sh command is one a test checks (the module docstring): `luffy` lines parse with the CLI's parser,
    `python -c` code compiles; an unchecked command fails here rather than go stale unseen."""
    commands = _sh_commands()
    assert sum(argv[0] == "luffy" for _, argv in commands) >= 4, commands
    stale = []
    for where, argv in commands:
        try:
            _check_sh_command(where, argv)
        except Exception as exc:  # noqa: BLE001 - click's UsageError, luffy's, a SyntaxError: each one names it
            stale.append(f"{where}: {shlex.join(argv)}: {type(exc).__name__}: {getattr(exc, 'message', exc)}")
    assert not stale, "\n".join(stale)


@pytest.mark.parametrize("line, refused", [
    ("luffy serve build/pydoc --replicaz 2", "No such option: --replicaz"),
    ("luffy serv build/pydoc", "No such command 'serv'"),
    ("luffy serve build/pydoc --replicas two", "integer"),
    ("luffy serve build/pydoc --draft d --prompt-lookup 3", "not both"),
    ("python -c 'import luffy; print('", "never closed"),
    ("curl localhost", "no test checks this command"),
])
def test_the_sh_check_refuses_a_stale_command(line, refused):
    with pytest.raises(Exception, match=re.escape(refused)):
        _check_sh_command("doc.md:1", shlex.split(line))


def test_the_sh_check_parses_as_luffy_does():
    assert _parse_luffy(["bench", "serve", "build/pydoc"])[0] == "bench-serve"  # main's rewrite
    assert _parse_luffy(["--debug", "build", "build/trt"]) == ("build", {"artifact": Path("build/trt"),
                                                                         "timing_cache": None})


def test_sh_serve_run_lines_give_the_builder_keys_it_accepts(monkeypatch):
    pytest.importorskip("fastapi", reason="the serve extra (pip install 'luffy[serve]') is not installed")
    from luffy.serving import ray as ray_app  # imports FastAPI, the serve extra

    built = []  # build_app reads its keys (serve_options), then builds the deployment graph, which needs Ray
    monkeypatch.setattr(ray_app, "application", lambda *args: built.append(args))
    lines = [(where, argv) for where, argv in _sh_commands() if argv[:2] == ["serve", "run"]]
    assert lines
    stale = []
    for where, argv in lines:
        module, _, attr = argv[2].partition(":")
        args = dict(arg.split("=", 1) for arg in argv[3:])  # strings, as ray.serve.scripts.convert_args_to_dict
        try:
            getattr(importlib.import_module(module), attr)(args)
        except Exception as exc:  # noqa: BLE001 - an unknown key or a bad value (UsageError), a moved builder
            stale.append(f"{where}: {shlex.join(argv)}: {type(exc).__name__}: {exc}")
    assert not stale, "\n".join(stale)
    assert len(built) == len(lines)
    with pytest.raises(UsageError, match="unknown serve option"):
        ray_app.build_app({"artifact": "a", "replicaz": "2"})
