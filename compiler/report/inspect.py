"""`luffy inspect`: what an artifact or a model source holds, as one JSON-able dict."""

from __future__ import annotations

from pathlib import Path

from ...errors import SourceError
from ...passes.driver import count_nodes
from ...runtimes.manifest import MANIFEST, read_manifest
from ..capture.onnx_file import load_onnx_source
from ..capture.torch_export import probe_kv_layout
from ..emit.manifest import io_signature
from ..sources.resolve import CAUSAL_LM, resolve_source
from ..sources.torch_model import load_torch_model
from .compile_report import op_histogram, parameter_count


def inspect_path(target: str) -> dict:
    """Summarize an artifact directory (verifying its files), an .onnx file, or a zoo / HF source.

    >>> inspect_path("build/llama-tiny")["kv_cache"]["num_layers"]   # doctest: +SKIP
    2
    """
    path = Path(target)
    if path.is_dir() and (path / MANIFEST).is_file():
        return _inspect_artifact(path)
    src = resolve_source(target)
    if src.kind == "onnx":
        return _inspect_onnx(src.path)
    if src.kind in ("zoo", "hf-dir"):
        return _inspect_torch(src)
    raise SourceError(f"{target}: inspect takes an artifact, an .onnx file, a zoo name or a model directory")


def _inspect_artifact(path: Path) -> dict:
    m = read_manifest(path)  # the schema holds what load needs; everything else here may be absent
    report = m.get("report") or {}
    kv = m.get("kv_cache")
    return {
        "artifact": str(path),
        "state": m["state"],
        "kind": m["kind"],
        "target": m["target"],
        "precision": m.get("precision"),
        "opt_level": m.get("opt_level"),
        "source": m.get("source"),
        "max_seq_len": m.get("max_seq_len"),
        "kv_cache": kv,
        "parameters": report.get("parameters"),
        "nodes": report.get("nodes"),
        "parity": report.get("parity"),
        "fusions": fusion_summary(report, kv.get("num_layers") if kv else None),
        "memory": report.get("memory"),
        "auto": report.get("auto"),  # --auto: every candidate measured and the one chosen
        "files": {name: info["size"] for name, info in m["files"].items()},
        "versions": m.get("versions"),
        "io": m.get("io"),
        "op_histogram": report.get("op_histogram") if isinstance(report.get("op_histogram"), dict) else {},
    }


def fusion_summary(report: dict, num_layers: int | None) -> dict:
    """Per rewrite pass: how often it fired, against the layer count, and the closest miss when it didn't."""
    summary = {}
    records = report.get("passes")
    for record in records if isinstance(records, list) else []:  # the report is informational: skip what is odd
        if not isinstance(record, dict) or not isinstance(record.get("matches"), int) or "name" not in record:
            continue
        entry = {"matches": record["matches"]}
        if isinstance(num_layers, int) and num_layers > 0:
            entry["per_layer"] = round(record["matches"] / num_layers, 2)
        misses = record.get("not_matched")
        if isinstance(misses, list) and misses and isinstance(misses[0], dict):
            entry["closest_miss"] = f"{misses[0].get('rule')}: {misses[0].get('reason')}"
        summary[str(record["name"])] = entry
    return summary


def _inspect_onnx(path: Path) -> dict:
    captured = load_onnx_source(path)
    return {
        "onnx": str(path),
        "kind": captured.kind,
        "kv_cache": captured.kv.to_json() if captured.kv else None,
        "parameters": parameter_count(captured.model),
        "nodes": count_nodes(captured.model),
        "io": io_signature(captured.model),
        "op_histogram": op_histogram(captured.model),
    }


def _inspect_torch(src) -> dict:
    tm = load_torch_model(src)
    config = getattr(tm.module, "config", None)
    return {
        "source": src.describe(),
        "kind": tm.kind,
        "architecture": tm.architecture,
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in tm.module.parameters()),
        "max_positions": tm.max_positions,
        "kv_cache": probe_kv_layout(tm.module).to_json() if tm.kind == CAUSAL_LM else None,
        "generation": tm.generation,
        "has_tokenizer": tm.tokenizer is not None or (tm.tokenizer_dir is not None and any(
            (tm.tokenizer_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"))),
    }
