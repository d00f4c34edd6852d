"""Can TensorRT's ONNX parser read this graph? Every node checked by name, op, domain and opset, before a build.

TensorRT reports an unsupported node by index, deep inside a build that may have run for minutes; luffy
checks the legalized graph against the parser's own operator list for the targeted TensorRT version
(`trt_onnx_ops.json`, from onnx-tensorrt's docs/operators.md per release) and against the documented
restrictions of the ops luffy emits, and names every node at fault before anything is built.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import onnx_ir as ir

from ...errors import UnsupportedModelError, UsageError
from ...plugins import DOMAIN as PLUGIN_DOMAIN
from ...plugins import plugin_for

OPS_FILE = Path(__file__).with_name("trt_onnx_ops.json")
STANDARD_DOMAINS = ("", "ai.onnx")


def version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(text).split(".")[:3])
    except ValueError:
        raise UsageError(f"TensorRT version {text!r}: expected MAJOR.MINOR[.PATCH], e.g. 10.16") from None


@functools.cache
def _lists() -> dict:
    return json.loads(OPS_FILE.read_text())["versions"]


def known_versions() -> list[str]:
    return sorted(_lists(), key=version_tuple)


def operator_list(trt_version: str) -> tuple[str, dict]:
    """(the list's version, its entry) for ``trt_version``: the newest list at or below it.

    >>> operator_list("10.16.1")[0], operator_list("10.12")[0]
    ('10.16', '10.6')
    """
    wanted = version_tuple(trt_version)
    if wanted[0] < 10:
        raise UsageError(f"TensorRT {trt_version}: luffy targets TensorRT 10 and 11 (strongly typed networks)")
    at_or_below = [v for v in known_versions() if version_tuple(v) <= wanted]
    chosen = at_or_below[-1] if at_or_below else known_versions()[0]
    return chosen, _lists()[chosen]


def first_version_with(op_type: str) -> str | None:
    return next((v for v in known_versions() if op_type in _lists()[v]["ops"]), None)


def check_graph(model: ir.Model, trt_version: str) -> dict:
    """Check every node of ``model`` against TensorRT ``trt_version``'s ONNX parser.

    A luffy plugin node (plugins/) passes where this TensorRT can load the plugin, and is listed in
    ``via_plugin``. The result lists each unsupported node with its name, op, domain and the reason;
    ``supported`` is true when there are none.
    """
    list_version, entry = operator_list(trt_version)
    release = version_tuple(trt_version)
    ops = entry["ops"]
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    low, high = entry["opset_range"]
    unsupported = []
    if opset is not None and not (low or 0) <= opset <= high:
        unsupported.append({"node": "(graph)", "op": f"opset {opset}", "domain": "ai.onnx",
                            "reason": f"TensorRT {list_version}'s parser reads opsets {low}-{high}"})
    via_plugin = []
    for node in model.graph:
        domain = node.domain or "ai.onnx"
        if node.domain == PLUGIN_DOMAIN:
            plugin = plugin_for(node.domain, node.op_type)
            # newer parsers have no importer of that name either, so they still fall back to the plugin
            if plugin is not None and release >= plugin.min_trt:
                via_plugin.append({"node": node.name, "op": node.op_type, "plugin": plugin.plugin_id})
                continue
            reason = (f"luffy plugin {node.domain}::{node.op_type} loads on TensorRT >= "
                      f"{'.'.join(map(str, plugin.min_trt))}" if plugin else "not a plugin this luffy has")
        elif node.domain not in STANDARD_DOMAINS:
            reason = f"no TensorRT importer for domain {domain} (standard ONNX only, or a registered plugin)"
        elif node.op_type not in ops:
            since = first_version_with(node.op_type)
            reason = f"added in TensorRT {since}" if since else "not in any TensorRT ONNX parser luffy knows"
        else:
            reason = _restriction(node)
        if reason:
            unsupported.append({"node": node.name, "op": node.op_type, "domain": domain, "reason": reason})
    return {
        "trt_version": trt_version, "operator_list": list_version, "source": entry["source"],
        "nodes_checked": len(model.graph), "via_plugin": via_plugin, "unsupported": unsupported,
        "supported": not unsupported,
    }


def require_supported(report: dict, where: str) -> None:
    """Raise one line naming every node TensorRT cannot parse (the first 8, then a count)."""
    bad = report["unsupported"]
    if not bad:
        return
    shown = "; ".join(f"{b['node']} ({b['domain']}::{b['op']}: {b['reason']})" for b in bad[:8])
    more = f"; and {len(bad) - 8} more" if len(bad) > 8 else ""
    raise UnsupportedModelError(
        f"{where}: {len(bad)} node(s) TensorRT {report['trt_version']}'s ONNX parser cannot read "
        f"(per its {report['operator_list']} operator list): {shown}{more}"
    )


def _restriction(node: ir.Node) -> str | None:
    """The documented restrictions of the ops luffy emits (docs/operators.md), checked on this node."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    present = [i for i, v in enumerate(node.inputs) if v is not None]
    if node.op_type == "Attention":
        if any(i >= 4 for i in present):
            return "past_key / past_value / nonpad_kv_seqlen inputs are unsupported (concatenate the cache outside)"
        if len([o for o in node.outputs if o.uses() or o.is_graph_output()]) > 1:
            return "only the first output is supported (no present_key / present_value / qk_matmul_output)"
        if attrs.get("softcap", 0.0) or attrs.get("qk_matmul_output_mode", 0):
            return "softcap and qk_matmul_output_mode are unsupported"
        ranks = {len(node.inputs[i].shape) for i in present if node.inputs[i].shape is not None}
        if ranks - {4}:
            return f"Q, K, V and attn_mask must be 4-D (got ranks {sorted(ranks)})"
    if node.op_type == "RotaryEmbedding" and len(node.inputs) > 3 and node.inputs[3] is not None \
            and node.inputs[3].dtype not in (None, ir.DataType.INT64):
        return "position_ids must be INT64"
    if node.op_type == "DequantizeLinear":
        return _dequantize_restriction(node)
    return None


def _dequantize_restriction(node: ir.Node) -> str | None:
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if zero is not None:
        if zero.const_value is None or zero.const_value.numpy().any():
            return "x_zero_point must be zero (symmetric quantization)"
    x, scale = node.inputs[0], node.inputs[1]
    if x.shape is None or scale.shape is None or len(scale.shape) in (0, 1):
        return None  # per-tensor / per-channel
    if len(scale.shape) != len(x.shape):
        return f"blockwise scales must have the input's rank ({len(x.shape)}), got {len(scale.shape)}"
    blocked = [a for a, (d, s) in enumerate(zip(x.shape, scale.shape)) if s != d and s != 1]
    if len(blocked) > 1:
        return "only a single blocking dimension is allowed"
    if x.dtype == ir.DataType.INT4 and isinstance(x.shape[-1], int) and x.shape[-1] % 2:
        return f"INT4 weights need an even last dimension (got {x.shape[-1]})"
    return None
