"""The documentation's shell commands run, so none goes stale: every ```bash block of README.md and docs/*.md,
page by page, its blocks in order in a scratch directory (luffy.benchmarks.docs_check; ```bash outside-ci
blocks run there, outside CI). Pages other than README start with the quick start's build/pydoc, the session's
llama-pydoc build, so the whole module compiles only what README's quick start compiles."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from luffy.benchmarks import docs_check

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
