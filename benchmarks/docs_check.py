"""Run the shell commands of README.md and docs/*.md, so none goes stale.

    python -m luffy.benchmarks.docs_check                 # every page: bash and bash outside-ci blocks
    python -m luffy.benchmarks.docs_check docs/serving.md --json docs-check.json

The convention, one per fenced block's info string:
  ``bash``              run by the test suite in CI (tests/test_docs.py): cheap, seconds, zoo models;
  ``bash outside-ci``   run only here: it needs a peer, a large model, Ray or minutes;
  ``sh``                not run (installation, a GPU, a Ray cluster), but checked by tests/test_docs.py: each
                        `luffy` line parses with the CLI's parser, a `serve run` line's keys go through the
                        builder it names, a `python -c` line compiles;
  anything else         not run (``text`` for output).
Each page runs in its own scratch directory, its blocks in order (a ``bash`` block may not depend on an
``outside-ci`` one, which CI skips). The scratch directory holds ``models_zoo`` (a link to the repository's,
for the texts under models_zoo/weights) and, except for README.md, whose quick start builds it,
``build/pydoc``: llama-pydoc compiled with the default options, as the quick start does. A block runs in
``bash -euo pipefail`` in its own process group, which is killed when the block ends (a server a block
started in the background goes with it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CI, OUTSIDE_CI = "bash", "bash outside-ci"
QUICK_START_ARTIFACT = "build/pydoc"  # what README's quick start compiles, and what the other pages use
BLOCK_TIMEOUT_S = 900
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.M | re.S)


@dataclass
class Block:
    page: str
    line: int  # of the opening fence
    info: str
    text: str


def pages(root: Path = REPO) -> list[Path]:
    """README.md, then docs/*.md in name order."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def blocks(page: Path, infos: tuple[str, ...] = (CI, OUTSIDE_CI)) -> list[Block]:
    """The page's fenced blocks whose info string is one of ``infos``, in order."""
    text = page.read_text()
    return [Block(page.name, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2))
            for m in _FENCE.finditer(text) if m.group(1).strip() in infos]


def prepare(scratch: Path, page: Path, artifact: Path | None) -> None:
    """The scratch directory a page's commands start in (see the module docstring)."""
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "models_zoo").symlink_to(REPO / "models_zoo", target_is_directory=True)
    if page.name != "README.md" and artifact is not None:
        shutil.copytree(artifact, scratch / QUICK_START_ARTIFACT)


def run_block(block: Block, cwd: Path, timeout: float = BLOCK_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``block`` in bash -euo pipefail, with this Python's `luffy` first on PATH; its process group is killed
    afterwards, whatever it left running."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.text], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, 124, out, err + f"\ntimed out after {timeout:g} s")
    _kill_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(0.5)


def failure(block: Block, done: subprocess.CompletedProcess) -> str:
    """One paragraph naming the page, the line and the command's exit code and output tail."""
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    return f"{block.page}:{block.line}: ```{block.info} block exited {done.returncode}:\n{block.text}{tail}"


def check_page(page: Path, work: Path, artifact: Path | None, infos: tuple[str, ...]) -> list[dict]:
    """Run a page's blocks in order, stopping at the first failure; one record per block run."""
    scratch = work / page.stem
    prepare(scratch, page, artifact)
    records = []
    for block in blocks(page, infos):
        start = time.perf_counter()
        done = run_block(block, scratch)
        records.append({"page": block.page, "line": block.line, "info": block.info, "returncode": done.returncode,
                        "seconds": round(time.perf_counter() - start, 1),
                        "error": failure(block, done) if done.returncode else None})
        if done.returncode:
            break
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luffy.benchmarks.docs_check", description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", type=Path, help="Pages to check [README.md and docs/*.md].")
    parser.add_argument("--ci-only", action="store_true", help="Only the bash blocks (what CI runs).")
    parser.add_argument("--json", type=Path, help="Write one record per block here.")
    args = parser.parse_args(argv)
    infos = (CI,) if args.ci_only else (CI, OUTSIDE_CI)
    with tempfile.TemporaryDirectory(prefix="luffy-docs-") as tmp:
        work = Path(tmp)
        artifact = work / "quick-start" / QUICK_START_ARTIFACT
        subprocess.run([sys.executable, "-m", "luffy", "compile", "llama-pydoc", "-o", str(artifact)], check=True)
        records = [r for page in (args.pages or pages()) for r in check_page(page.resolve(), work, artifact, infos)]
    for r in records:
        print(f"{'ok  ' if not r['error'] else 'FAIL'} {r['page']}:{r['line']} ({r['info']}, {r['seconds']} s)")
        if r["error"]:
            print(r["error"], file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 1 if any(r["error"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
