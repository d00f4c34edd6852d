"""The artifact directory: files, manifest, atomic write, and the checks `load` runs before trusting it.

An artifact is written into a hidden temporary sibling directory and renamed into place only after
every file and the manifest (written last) are on disk, so an interrupted or failed compile never
leaves a directory that `load` accepts. This module imports no torch: the runtime uses it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import ArtifactError, UsageError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_READY = "ready"
STATE_NEEDS_BUILD = "needs-build"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_table(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file below ``directory`` except the manifest, keyed by relative path."""
    table = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(directory).as_posix()
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


@contextlib.contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``output``, on any failure it vanishes.

    The staging directory is a hidden sibling (same filesystem, so the final rename is atomic) and has
    no manifest until the caller writes one, so even a killed process leaves nothing ``load`` accepts.
    """
    output = Path(output)
    if output.exists() and not _replaceable(output):
        raise UsageError(f"{output}: exists and is not a luffy artifact; refusing to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield stage
        if not (stage / MANIFEST).is_file():
            raise ArtifactError(f"{output}: internal error, manifest was not written")
        old = None
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / "artifact")
        os.replace(stage, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


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


def read_manifest(directory: str | os.PathLike, verify_files: bool = True) -> dict:
    """Read and check an artifact's manifest: format version, every file's size and sha256.

    >>> manifest = read_manifest("build/llama-tiny")  # doctest: +SKIP
    >>> manifest["target"], manifest["state"]          # doctest: +SKIP
    ('ort', 'ready')
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; not a luffy artifact (or a compile that did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: not a manifest object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {version!r} is not supported by this luffy (reads {FORMAT_VERSION}); "
            "recompile the model with this version"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}: no file table")
    if verify_files:
        for rel, info in files.items():
            verify_file(directory, rel, info)
    return manifest


def verify_file(directory: Path, rel: str, info: dict) -> None:
    target = directory / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or target.is_symlink():
        raise ArtifactError(f"{directory / MANIFEST}: file entry {rel!r} points outside the artifact")
    if not target.is_file():
        raise ArtifactError(f"{target}: listed in the manifest but missing")
    size = target.stat().st_size
    if size != info.get("size"):
        raise ArtifactError(f"{target}: size {size} does not match the manifest's {info.get('size')}; the file was modified")
    digest = sha256_file(target)
    if digest != info.get("sha256"):
        raise ArtifactError(
            f"{target}: sha256 {digest[:16]}… does not match the manifest's {str(info.get('sha256'))[:16]}…; "
            "the file was modified after compile"
        )
