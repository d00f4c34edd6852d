"""The compile report: per-pass records, op histogram, parameters, memory and precision, in one dict."""

from __future__ import annotations

import collections
from pathlib import Path

import onnx_ir as ir

from ...errors import first_line
from ...passes.driver import count_nodes
from ...runtimes.cpu_features import int8_kernel_path, u8s8_saturates
from ..config import LuffyConfig
from ..sources.resolve import CAUSAL_LM
from .memory import decoder_memory_report


def compile_report(cfg: LuffyConfig, capture, model: ir.Model, records: list[dict], checks: dict, seconds: float) -> dict:
    """``checks`` holds what was measured on the staged files: ``parity``, ``memory`` and ``quality`` (each None
    when not run)."""
    return {
        "seconds_total": round(seconds, 3),
        "capture": {
            "seconds": round(capture.seconds, 3),
            "method": _capture_method(capture),
            "nodes": capture.nodes, "notes": capture.graph.notes,
            **({"streamed": capture.streamed.describe()} if getattr(capture, "streamed", None) is not None else {}),
        },
        "passes": records,
        "nodes": count_nodes(model),
        "op_histogram": op_histogram(model),
        "parameters": parameter_count(model),
        "parity": checks["parity"],
        "memory": checks["memory"],
        "precision": _precision_report(cfg, records),
        "kv_cache": _kv_cache_report(cfg, capture, records),
        "quality": checks["quality"],
        "preflight": capture.estimate.to_json() if getattr(capture, "estimate", None) is not None else None,
    }


def _capture_method(capture) -> str:
    if capture.src.kind == "onnx":
        return "onnx file"
    if getattr(capture, "streamed", None) is not None:
        return "streamed: a layer template exported by torch.export + torch.onnx (dynamo), stamped across the depth"
    return "torch.export + torch.onnx (dynamo)"


def text(value) -> str:
    # ONNX is proto2: protobuf hands back a string field that is not UTF-8 as bytes
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def op_histogram(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(
        f"{text(n.domain)}::{text(n.op_type)}" if n.domain not in ("", "ai.onnx") else text(n.op_type)
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return dict(counts.most_common())


def parameter_count(model: ir.Model) -> int:
    """Weights the model holds, counted as the original matrices (a packed int4 MatMulNBits weight of
    K x N counts K*N, not its bytes; its scales and zero points are not parameters)."""
    quant_aux, total = set(), 0
    for node in model.graph:
        k, n = node.attributes.get("K"), node.attributes.get("N")
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and k is not None and n is not None:
            total += k.value * n.value if isinstance(k.value, int) and isinstance(n.value, int) else 0
            quant_aux.update(id(v) for v in node.inputs[1:] if v is not None)
        elif node.op_type in ("GatherBlockQuantized", "DequantizeLinear"):
            quant_aux.update(id(v) for v in node.inputs[1:] if v is not None)
    for value in model.graph.initializers.values():
        if id(value) not in quant_aux and value.const_value is not None:
            total += value.const_value.size
    return total


def reduce_range(cfg: LuffyConfig) -> bool:
    return u8s8_saturates() if cfg.reduce_range is None else cfg.reduce_range


def _precision_report(cfg: LuffyConfig, records: list[dict]) -> dict:
    """What was quantized and how: the precision passes' own records, plus totals by op."""
    out = {"precision": cfg.precision}
    if cfg.precision == "int8-dynamic":
        out["reduce_range_chosen_by"] = "this CPU" if cfg.reduce_range is None else "option"
        out["compiled_on"] = int8_kernel_path()
    for record in records:
        if record["name"] in ("quantize-weights", "convert-fp16", "quantize-dynamic-int8"):
            out.update({k: v for k, v in record.items() if k not in ("name", "modified", "nodes_before", "nodes_after")})
    return out


def _kv_cache_report(cfg: LuffyConfig, capture, records: list[dict]) -> dict | None:
    """The KV cache's precision (chosen or the compute's), bytes per token, scales, and how a step takes rows."""
    kv = capture.graph.kv
    if kv is None:
        return None
    gqa = next((r for r in records if r["name"] == "fuse-gqa"), {})
    out = {"dtype": kv.dtype, "chosen": cfg.kv_cache_dtype, "bytes_per_token": kv.to_json()["bytes_per_token"],
           "multi_row_steps": bool(gqa.get("multi_row"))}
    if cfg.kv_cache_dtype in ("int8", "int4"):
        source = f"--kv-calib {cfg.kv_calib}" if cfg.kv_calib else f"--calib {cfg.calib}"
        per = "per tensor (layer and kind)" if cfg.target == "trt" else "per channel (key and value)"
        out["scales"] = f"static {per}, largest |x| on {source}"
    return out


MEMORY_SCENARIO_TOKENS = 128  # the report's reference prefill / decode point (the benchmark's prompt length)


def memory_report(model_path: Path, captured, max_len: int | None) -> dict | None:
    if captured.kind != CAUSAL_LM:
        return None
    tokens = min(MEMORY_SCENARIO_TOKENS, (max_len or MEMORY_SCENARIO_TOKENS) - 1)
    try:
        report = decoder_memory_report(model_path, tokens)
    except Exception as exc:  # noqa: BLE001 - an estimate: the artifact passed parity, so say why and go on
        # onnxruntime's symbolic shape inference crashes on some graphs (PhiMoE, gpt-oss: a Sub whose output
        # it leaves without a shape, "object of type 'NoneType' has no len()").
        report = {"error": f"symbolic shape inference failed ({type(exc).__name__}: {first_line(exc, 200)})"}
    report["kv_cache_bytes_per_token"] = captured.kv.to_json()["bytes_per_token"]
    return report
