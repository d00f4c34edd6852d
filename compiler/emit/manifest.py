"""The manifest a compile writes: I/O signature, dims, KV layout, versions, options (runtimes/manifest.py reads
and validates it; this module only builds it)."""

from __future__ import annotations

import functools
import importlib.metadata as md
import platform

import numpy as np
import onnx_ir as ir

from ... import __version__
from ...runtimes.manifest import FORMAT_VERSION, STATE_READY
from ..config import LuffyConfig
from ..report.compile_report import reduce_range, text
from ..sources.resolve import CAUSAL_LM
from .tokenizer_files import generation_ids_beside

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def build_manifest(cfg: LuffyConfig, capture, model: ir.Model, emitted: dict, report: dict) -> dict:
    """The manifest of a ready ORT artifact (a target's ``finish`` may change its state and add its section).

    ``capture`` is the compile's CaptureResult; ``emitted`` what writing the files gave: ``external`` (weights
    in model.onnx.data), ``tokenizer_files`` and ``chat_template``.
    """
    src, tm, captured, max_len = capture.src, capture.tm, capture.graph, capture.max_len
    signature = io_signature(model)
    kind = captured.kind
    generation = dict(tm.generation) if tm is not None else {}
    if src.kind == "onnx":
        generation = generation_ids_beside(src.path)
    return {
        "format_version": FORMAT_VERSION,
        "state": STATE_READY,
        "kind": kind,
        "target": cfg.target,
        "precision": cfg.precision,
        "opt_level": cfg.opt_level,
        "options": cfg.to_json(),
        "versions": dict(_versions()),
        "source": {**src.describe(), "architecture": tm.architecture if tm is not None else None},
        "model_file": MODEL_FILE,
        "external_data": DATA_FILE if emitted["external"] else None,
        "opset_imports": opset_imports(model),
        "ir_version": model.ir_version,
        "io": signature,
        "dims": _dim_ranges(signature, max_len, kind),
        "max_seq_len": max_len,
        "kv_cache": _kv_json(captured, signature, model),
        "generation": generation,
        "tokenizer": "tokenizer.json" if "tokenizer.json" in emitted["tokenizer_files"] else None,
        # int8-dynamic with 8-bit weights is only correct where ORT's u8s8 kernels do not saturate (VNNI)
        **({"int8_reduce_range": reduce_range(cfg)} if cfg.precision == "int8-dynamic" else {}),
        "report": report,
        "chat_template": emitted["chat_template"],
    }


def opset_imports(model: ir.Model) -> dict[str, int]:
    return {domain or "ai.onnx": version for domain, version in model.opset_imports.items()}


def _dtype_name(value: ir.Value) -> str:
    if value.dtype is None:
        return "unknown"
    try:
        return str(np.dtype(value.dtype.numpy()))
    except TypeError:  # ONNX types numpy has no dtype for (UNDEFINED, string in some versions): ONNX's own name
        return value.dtype.name.lower()


def io_signature(model: ir.Model) -> dict:
    def describe(value: ir.Value) -> dict:
        shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None
        return {"name": text(value.name), "dtype": _dtype_name(value), "shape": shape}

    return {"inputs": [describe(v) for v in model.graph.inputs], "outputs": [describe(v) for v in model.graph.outputs]}


def _dim_ranges(signature: dict, max_len: int | None, kind: str) -> dict:
    names = {d for io in signature.values() for v in io for d in (v["shape"] or []) if isinstance(d, str)}
    ranges = {name: {"min": 1, "max": None} for name in sorted(names)}
    if kind == CAUSAL_LM:
        ranges.update({
            "batch": {"min": 1, "max": None},
            "seq": {"min": 1, "max": max_len},
            "past": {"min": 0, "max": max_len - 1 if max_len else None},
            "total": {"min": 1, "max": max_len},
        })
        if "max_seq" in ranges:  # shared-buffer KV: the buffers' capacity, chosen per generate call
            ranges["max_seq"] = {"min": 1, "max": max_len}
    elif "seq" in ranges and max_len:
        ranges["seq"]["max"] = max_len
    return ranges


def _kv_json(captured, signature: dict, model: ir.Model) -> dict | None:
    if captured.kv is None:
        return None
    shared = any(v["name"] == "seqlens_k" for v in signature["inputs"])
    # shared: one buffer per layer and kind, bound as past and present (fuse-gqa); else present = past + new
    kv = {**captured.kv.to_json(), "mode": "shared-buffer" if shared else "concat"}
    if _rotates_in_attention(model):
        # pack-qkv: GQA rotates by KV buffer index, so a row may hold left padding but no gap (runtimes/ort_slots.py)
        kv["positions"] = "buffer"
    return kv


def _rotates_in_attention(model: ir.Model) -> bool:
    return any(n.op_type == "GroupQueryAttention" and "do_rotary" in n.attributes and n.attributes["do_rotary"].value
               for n in model.graph)


@functools.cache  # importlib.metadata parses each package's METADATA: ~12 ms a compile, for the same answer
def _versions() -> dict:
    out = {"luffy": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
