"""Writing the artifact directory: its files, the manifest, and the atomic publish.

An artifact is written into a hidden temporary sibling directory and renamed into place only after
every file and the manifest (written last) are on disk, so an interrupted or failed compile never
leaves a directory that `load` accepts. Reading and checking an artifact is the runtime's half
(runtimes/manifest.py), which this module shares its constants with.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ...errors import ArtifactError, UsageError
from ...runtimes.manifest import MANIFEST, sha256_file


def file_table(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file below ``directory`` except the manifest, keyed by relative path."""
    table = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(directory).as_posix()
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _remove_stale_staging(output: Path) -> None:
    """Remove the staging and old-copy directories of earlier compiles of ``output`` whose process is gone (a
    SIGKILL or power loss skips every cleanup). Their names carry the writer's pid."""
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.(partial|old)-(\d+)-")
    for sibling in output.parent.iterdir() if output.parent.is_dir() else ():
        match = pattern.match(sibling.name)
        if not match or not sibling.is_dir():
            continue
        pid = int(match.group(2))
        try:
            os.kill(pid, 0)
            continue  # still running (or the pid was reused): not ours to remove
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(sibling, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``output``, on any failure it vanishes.

    The staging directory is a hidden sibling (same filesystem, so the final rename is atomic) and has
    no manifest until the caller writes one, so even a killed process leaves nothing ``load`` accepts;
    the next compile of the same output removes what a killed one left. The published directory gets
    the permissions the umask gives a new directory (mkdtemp's are 0700, which no service user can read).
    """
    output = Path(output)
    check_output_location(output)
    _remove_stale_staging(output)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
    try:
        yield stage
        if not (stage / MANIFEST).is_file():
            raise ArtifactError(f"{output}: internal error, manifest was not written")
        os.chmod(stage, 0o777 & ~_umask())
        old = None
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-{os.getpid()}-", dir=output.parent))
            os.replace(output, old / "artifact")
        os.replace(stage, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def check_output_location(output: Path) -> None:
    """Fail before any work when ``output`` cannot become an artifact: it is a file or a foreign directory, or
    its parent cannot be created or written."""
    output = Path(output)
    if output.exists() and not _replaceable(output):
        raise UsageError(f"{output}: exists and is not a luffy artifact; refusing to overwrite it")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{output}: cannot create the output's parent directory {parent} ({exc.strerror or exc})") from None
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{output}: the output's parent directory {parent} is not writable")


def _replaceable(path: Path) -> bool:
    if path.is_dir():
        return (path / MANIFEST).is_file() or not any(path.iterdir())
    return False


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Fill in the file table and write manifest.json (last, so its presence marks a complete artifact)."""
    manifest = dict(manifest)
    manifest["files"] = file_table(directory)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return manifest
