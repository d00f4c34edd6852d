"""The artifact contract both sides keep: the manifest's schema, reading it, and the step graph's names.

The compiler writes artifacts (compiler/emit/artifact.py) and the runtimes read them; everything both must agree on
lives here, so a serving process needs neither the compiler nor torch to check an artifact. The schema is a
small table checked by hand rather than JSON Schema: the runtime's dependencies stay onnxruntime, numpy and
tokenizers, and every failure is one line naming the manifest and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ArtifactError, first_line

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_READY = "ready"
STATE_NEEDS_BUILD = "needs-build"
KINDS = ("causal-lm", "encoder", "module")

# The decoder step graph (one graph serves prefill and decode):
#   input_ids [batch, seq], attention_mask [batch, total], position_ids [batch, seq] (optional),
#   past_key_values.N.key/value -> present.N.key/value, logits [batch, kept, vocab].
# KV_SHARED graphs (fuse-gqa) take capacity-sized buffers bound as past and present, plus seqlens_k
# [batch] (each row's length - 1 after the step) and total_sequence_length; KV_CONCAT graphs return
# present = past + new. logits_to_keep, when present, is how many last positions get logits. query_seqlens
# [batch] (multi-row graphs): each row's valid tokens in a right-padded step; logits_indices [batch, kept] then
# says which positions of each row get logits.
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
SEQLENS, TOTAL, KEEP, QUERY_SEQLENS = "seqlens_k", "total_sequence_length", "logits_to_keep", "query_seqlens"
INDICES = "logits_indices"  # multi-row graphs keep these positions of each row [batch, kept] instead of the last
KV_SHARED, KV_CONCAT = "shared-buffer", "concat"


def past_name(kv: dict, layer: int, kind: str) -> str:
    """The graph input of ``layer``'s cache, ``kind`` "key" or "value" (the manifest's ``kv_cache.past_input``)."""
    return kv["past_input"].format(layer=layer, kind=kind)


def present_name(kv: dict, layer: int, kind: str) -> str:
    return kv["present_output"].format(layer=layer, kind=kind)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# field -> (types allowed, required). Nested objects get their own table below.
_STR, _INT, _DICT, _NONE = (str,), (int,), (dict,), (type(None),)
SCHEMA = {
    "format_version": (_INT, True),
    "state": (_STR, True),
    "kind": (_STR, True),
    "target": (_STR, True),
    "model_file": (_STR, True),
    "files": (_DICT, True),
    "external_data": (_STR + _NONE, False),
    "tokenizer": (_STR + _NONE, False),
    "max_seq_len": (_INT + _NONE, False),
    "opset_imports": (_DICT, False),
    "ir_version": (_INT, False),
    "io": (_DICT, False),
    "kv_cache": (_DICT + _NONE, False),
    "generation": (_DICT, False),
    "tensorrt": (_DICT + _NONE, False),
    "chat_template": (_DICT + _NONE, False),
    "report": (_DICT, False),
}
KV_SCHEMA = {"num_layers": (_INT, True), "past_input": (_STR, True), "present_output": (_STR, True),
             "mode": (_STR, False), "positions": (_STR, False)}
POSITIONS_INPUT, POSITIONS_BUFFER = "input", "buffer"  # kv_cache.positions: position_ids, or the KV buffer index
FILE_SCHEMA = {"sha256": (_STR, True), "size": (_INT, True)}
CHAT_SCHEMA = {"file": (_STR, True), "bos_token": (_STR + _NONE, False), "eos_token": (_STR + _NONE, False)}
IO_SCHEMA = {"name": (_STR, True), "dtype": (_STR, True), "shape": ((list,) + _NONE, True)}


def _check_fields(path: Path, where: str, obj: dict, schema: dict) -> None:
    for key, (types, required) in schema.items():
        if key not in obj:
            if required:
                raise ArtifactError(f"{path}: field {where}{key} is missing")
            continue
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else
                                {str: "string", int: "integer", dict: "object", list: "array"}[t] for t in types)
            raise ArtifactError(f"{path}: field {where}{key} must be {names}, got {type(value).__name__} {value!r:.60}")


def _check_values(path: Path, manifest: dict) -> None:
    for key, allowed in (("state", (STATE_READY, STATE_NEEDS_BUILD)), ("kind", KINDS), ("target", ("ort", "trt"))):
        if manifest[key] not in allowed:
            raise ArtifactError(f"{path}: field {key} is {manifest[key]!r}; expected one of {', '.join(allowed)}")
    if manifest.get("max_seq_len") is not None and manifest["max_seq_len"] < 1:
        raise ArtifactError(f"{path}: field max_seq_len must be >= 1, got {manifest['max_seq_len']}")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in manifest.get("opset_imports", {}).values()):
        raise ArtifactError(f"{path}: field opset_imports must map domains to integer versions")
    kv = manifest.get("kv_cache")
    if manifest["kind"] == "causal-lm" and kv is None:
        raise ArtifactError(f"{path}: field kv_cache is missing; a causal-lm artifact must describe its KV cache")
    if kv is not None:
        _check_fields(path, "kv_cache.", kv, KV_SCHEMA)
        if kv["num_layers"] < 1 or kv.get("mode", KV_CONCAT) not in (KV_SHARED, KV_CONCAT):
            raise ArtifactError(f"{path}: field kv_cache has num_layers {kv['num_layers']} and mode {kv.get('mode')!r}")
        if kv.get("positions", POSITIONS_INPUT) not in (POSITIONS_INPUT, POSITIONS_BUFFER):
            raise ArtifactError(f"{path}: field kv_cache.positions is {kv['positions']!r}; expected "
                                f"{POSITIONS_INPUT} or {POSITIONS_BUFFER}")
        for key in ("past_input", "present_output"):
            if "{layer}" not in kv[key] or "{kind}" not in kv[key]:
                raise ArtifactError(f"{path}: field kv_cache.{key} {kv[key]!r} must contain {{layer}} and {{kind}}")
    if manifest.get("chat_template") is not None:
        _check_fields(path, "chat_template.", manifest["chat_template"], CHAT_SCHEMA)
    for key, value in manifest.get("generation", {}).items():
        ids = value if isinstance(value, list) else [value]
        if key.endswith("_token_id") and not all(v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in ids):
            raise ArtifactError(f"{path}: field generation.{key} must be a token id, a list of them, or null; "
                                f"got {value!r:.60}")
    for direction in ("inputs", "outputs"):
        values = manifest.get("io", {}).get(direction, [])
        if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
            raise ArtifactError(f"{path}: field io.{direction} must be a list of objects")
        for i, value in enumerate(values):
            _check_fields(path, f"io.{direction}[{i}].", value, IO_SCHEMA)
    for rel, info in manifest["files"].items():
        if not isinstance(info, dict):
            raise ArtifactError(f"{path}: field files.{rel} must be an object with sha256 and size")
        _check_fields(path, f"files.{rel}.", info, FILE_SCHEMA)


def validate_manifest(path: Path, manifest) -> dict:
    """Check ``manifest`` (parsed from ``path``) against the schema; the first problem is a one-line ArtifactError.

    Every file the manifest names (model, external data, tokenizer, engine) must be one it lists and
    hashes, inside the artifact.
    """
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: not a manifest object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {version!r} is not supported by this luffy (reads {FORMAT_VERSION}); "
            "recompile the model with this version"
        )
    _check_fields(path, "", manifest, SCHEMA)
    if not manifest["files"]:
        raise ArtifactError(f"{path}: no file table")
    _check_values(path, manifest)
    for rel in manifest["files"]:
        _require_inside(path, "file table", rel)
    named = [("model_file", manifest["model_file"]), ("external_data", manifest.get("external_data")),
             ("tokenizer", manifest.get("tokenizer")),
             ("tensorrt.engine_file", (manifest.get("tensorrt") or {}).get("engine_file")),
             ("chat_template.file", (manifest.get("chat_template") or {}).get("file"))]
    for field, rel in named:
        if rel is None:
            continue
        if not isinstance(rel, str):
            raise ArtifactError(f"{path}: field {field} must be a file name, got {rel!r:.60}")
        _require_inside(path, f"field {field}", rel)
        if rel not in manifest["files"]:
            raise ArtifactError(f"{path}: field {field} names {rel!r}, which the file table does not list and hash")
    return manifest


def _require_inside(path: Path, where: str, rel: str) -> None:
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith(("/", "\\")) or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise ArtifactError(f"{path}: {where} entry {rel!r} points outside the artifact")


def read_manifest(directory: str | os.PathLike, verify_files: bool = True) -> dict:
    """Read and check an artifact's manifest: schema, format version, every file's size and sha256.

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
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({first_line(exc)})") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    validate_manifest(path, manifest)
    if verify_files:
        for rel, info in manifest["files"].items():
            verify_file(directory, rel, info)
    return manifest


def verify_file(directory: Path, rel: str, info: dict) -> None:
    """Refuse a listed file that is missing, a symlink, resolves outside the artifact, or differs from its hash."""
    target = directory / rel
    _require_inside(directory / MANIFEST, "file table", rel)
    if target.is_symlink() or not target.resolve().is_relative_to(directory.resolve()):
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


@dataclass(frozen=True)
class StepGraph:
    """What a runtime needs to drive a decoder step graph, checked against the graph's real I/O."""

    layers: tuple[tuple[int, int], ...]  # (kv_heads, head_dim) per layer
    vocab: int
    kv_type: str  # the past inputs' ONNX type, e.g. "tensor(float)"
    shared_kv: bool  # KV_SHARED: one buffer per layer and kind is both past and present
    takes_positions: bool
    # kv_cache.positions "buffer": attention rotates by KV buffer index, so a row may be left-padded but hold no
    # masked position between real ones (transformers would number the later tokens differently)
    positions_from_buffer: bool
    keeps_logits: bool  # takes logits_to_keep
    picks_logits: bool  # takes logits_indices
    multi_row: bool  # takes query_seqlens: several rows of several tokens with a cache in one step
    past_names: tuple[tuple[str, str], ...]  # per layer: (key, value) inputs
    present_names: tuple[tuple[str, str], ...]


def step_graph(path: Path, manifest: dict, inputs: dict[str, tuple[str, list]], outputs: dict[str, list]) -> StepGraph:
    """Check that the graph (``inputs``: name -> (type, shape), ``outputs``: name -> shape) is the step graph the
    manifest describes, and return how to drive it. Every mismatch is a one-line ArtifactError.

    >>> info = step_graph(path, manifest, {i.name: (i.type, i.shape) for i in sess.get_inputs()},
    ...                   {o.name: o.shape for o in sess.get_outputs()})   # doctest: +SKIP
    """
    kv = manifest["kv_cache"]
    layers = kv["num_layers"]
    past = tuple((past_name(kv, i, "key"), past_name(kv, i, "value")) for i in range(layers))
    present = tuple((present_name(kv, i, "key"), present_name(kv, i, "value")) for i in range(layers))
    missing = [n for pair in past for n in pair if n not in inputs] + [n for pair in present for n in pair
                                                                        if n not in outputs]
    missing += [n for n in (INPUT_IDS, ATTENTION_MASK) if n not in inputs] + ([LOGITS] if LOGITS not in outputs else [])
    if missing:
        raise ArtifactError(f"{path}: the manifest's step graph names {', '.join(missing[:4])}, which the graph "
                            f"does not have")
    unknown = set(inputs) - {INPUT_IDS, ATTENTION_MASK, POSITION_IDS, SEQLENS, TOTAL, KEEP, INDICES, QUERY_SEQLENS} - \
        {n for p in past for n in p}
    if unknown:
        raise ArtifactError(f"{path}: decoder graph has inputs the runtime cannot feed: {', '.join(sorted(unknown))}")
    shapes = []
    for key, _ in past:
        shape = inputs[key][1]
        if len(shape) != 4 or not all(isinstance(shape[i], int) for i in (1, 3)):
            raise ArtifactError(f"{path}: input {key} has shape {shape}; expected [batch, kv_heads, length, head_dim]")
        shapes.append((int(shape[1]), int(shape[3])))
    vocab = outputs[LOGITS][-1] if outputs[LOGITS] else None
    if not isinstance(vocab, int):
        raise ArtifactError(f"{path}: logits output has no static vocabulary dimension ({outputs[LOGITS]})")
    return StepGraph(
        layers=tuple(shapes), vocab=vocab, kv_type=inputs[past[0][0]][0], shared_kv=SEQLENS in inputs,
        takes_positions=POSITION_IDS in inputs, positions_from_buffer=kv.get("positions") == POSITIONS_BUFFER,
        keeps_logits=KEEP in inputs, picks_logits=INDICES in inputs, multi_row=QUERY_SEQLENS in inputs,
        past_names=past, present_names=present,
    )
