"""The streamed compile's parity check: the whole artifact against transformers, one layer's weights at a time.

The same cases as the whole-model check (compiler/parity.py: a padded prefill, a decode step on a cache) run
through the artifact region by region (regions.py) and through transformers' own forward with each module's
weights read when it runs (reference.py). Every layer's cache output (present.<j>.key/value) is compared, so a
layer that goes wrong is named, and the logits at the end; fp32 is held to 1e-4, a quantized artifact's
differences are reported (its quality is measured by --eval). Peak memory is one region's ORT session or one
module's fp32 weights, whichever is larger.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from ...errors import CaptureError, UnsupportedModelError, first_line
from ..capture.torch_export import _DecoderStep, decoder_example
from ..quality.parity import DECODER_CASES, FP32_ATOL, _real_positions, buffer_positions
from ..quality.step_io import interface_feeds
from .reference import weights_on_demand
from .regions import RegionRunner

QUANTIZED_CACHE = ("tensor(int8)", "tensor(uint8)")


def check_streamed_parity(streamed, captured, model_path: Path, vocab: int, precision: str, say=lambda m: None) -> dict:
    """Compare the artifact at ``model_path`` with transformers on ``streamed``'s checkpoint; raise on fp32 > 1e-4."""
    kv = captured.kv
    names = _graph_inputs(model_path)
    # a graph that rotates inside GroupQueryAttention (pack-qkv) numbers positions by buffer index: the reference
    # is fed that numbering so the caches compare too (quality/parity.py's buffer_positions)
    numbered = (lambda args: buffer_positions(args)) if "position_ids" not in names else (lambda args: args)
    chosen = _cases_for(names)
    cases = {label: numbered(decoder_example(kv, vocab=vocab, seed=17, **shape)) for label, shape in chosen}
    graph_outputs = run_cases(RegionRunner.from_artifact(model_path), names, cases, say)
    expected = _torch_outputs(streamed, cases, say)
    diffs = {}
    for label, shape in chosen:
        mask = cases[label][1].numpy().astype(bool)
        diffs[label] = _differences(graph_outputs[label], expected[label], mask, shape["past"])
    worst = max(d for v in diffs.values() for d in v.values())
    tolerance = FP32_ATOL if precision == "fp32" else None
    report = {
        "method": "streamed: the artifact region by region on ONNX Runtime, transformers module by module, one "
                  "layer's weights at a time",
        "max_abs_diff": worst, "tolerance": tolerance,
        "cases": {k: max(v.values()) for k, v in diffs.items()},
        "layers": _per_layer(diffs),
        "passed": tolerance is None or worst <= tolerance,
    }
    if tolerance is None:
        report["note"] = f"{precision}: no NaN/Inf; quality is measured by perplexity (--eval), not by 1e-4"
    if not report["passed"]:
        case, name, diff = _first_failure(diffs, tolerance)
        raise CaptureError(f"parity check failed: {name} ({case}) is the first output to differ from PyTorch, by "
                           f"{diff:.3g} > {FP32_ATOL}; rerun with --opt-level 0 to see whether a pass is at fault")
    return report


def _cases_for(names: dict[str, str]) -> tuple:
    """The decoder cases an artifact takes: an int8/int4 cache cannot take the decode case's random float past (its
    scales live in the graph), so it runs the prefill (a prompt reads back the codes it wrote), as the whole-model
    check does (quality/parity.py); quality is measured by --eval."""
    quantized = any(kind in QUANTIZED_CACHE for kind in names.values())
    return DECODER_CASES[:1] if quantized else DECODER_CASES


def _first_failure(diffs: dict, tolerance: float) -> tuple[str, str, float]:
    """The shallowest output above ``tolerance``: layer by layer through the caches, then the logits."""
    def depth(name: str) -> int:
        return int(name.split(".")[1]) if name.startswith("present.") else 1 << 30

    failures = [(depth(n), c, n, d) for c, v in diffs.items() for n, d in v.items() if d > tolerance]
    _, case, name, diff = min(failures)
    return case, name, diff


def check_runs(captured, model_path: Path, vocab: int, spec: str) -> None:
    """--no-check-parity: every region loads on ONNX Runtime and the decode case runs to finite logits."""
    label, shape = _cases_for(_graph_inputs(model_path))[-1]
    try:
        produced = _artifact_outputs(model_path, {label: decoder_example(captured.kv, vocab=vocab, seed=17, **shape)},
                                     lambda message: None)
    except Exception as exc:  # noqa: BLE001 - ORT's Fail/InvalidGraph/NotImplemented, as check_loadable words it
        raise UnsupportedModelError(f"{spec}: onnxruntime {onnxruntime.__version__} cannot load the compiled graph: "
                                    f"{first_line(exc)}") from None
    if not np.all(np.isfinite(produced[label]["logits"])):
        raise CaptureError(f"{spec}: the compiled graph computes NaN or Inf logits")


def _graph_inputs(model_path: Path) -> dict[str, str]:
    """The artifact's input names and their ONNX type strings, read without its weights."""
    return {i.name: _type_string(i) for i in onnx.load(str(model_path), load_external_data=False).graph.input}


def _artifact_outputs(model_path: Path, cases: dict, say) -> dict:
    return run_cases(RegionRunner.from_artifact(model_path), _graph_inputs(model_path), cases, say)


def run_cases(runner: RegionRunner, names: dict[str, str], cases: dict, say) -> dict:
    """Decoder cases (capture's example tuples) through ``runner``: {label: {output: array}}, caches cut to length."""
    batches, totals = [], []
    for ids, mask, pos, past in cases.values():
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        for layer in range(len(past) // 2):
            feeds[f"past_key_values.{layer}.key"] = past[2 * layer].numpy()
            feeds[f"past_key_values.{layer}.value"] = past[2 * layer + 1].numpy()
        for name in [n for n in feeds if names.get(n) == "tensor(uint8)"]:  # int4: two per byte (an empty past)
            feeds[name] = feeds[name][..., :feeds[name].shape[-1] // 2]
        feeds, total = interface_feeds(names, feeds)
        batches.append(feeds)
        totals.append(total)
    produced = runner.run(batches, lambda r: say(f"parity: onnxruntime, region {r + 2} of {len(runner.order)}"))
    return {label: {k: (v[:, :, :total] if k.startswith("present.") else v) for k, v in out.items()}
            for label, out, total in zip(cases, produced, totals)}


def _type_string(value_info) -> str:
    return f"tensor({onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name})".replace(
        "float32", "float").replace("float64", "double")


def _torch_outputs(streamed, cases: dict, say) -> dict:
    import torch

    step = _DecoderStep(streamed.skeleton).module
    out = {}
    with weights_on_demand(streamed.skeleton, streamed.checkpoint, streamed.keys), torch.no_grad():
        for label, (ids, mask, pos, past) in cases.items():
            say(f"parity ({label}): transformers, module by module")
            result = step(ids, mask, pos, past)
            out[label] = [t.detach().float().numpy() for t in result]
    return out


def _differences(graph: dict, expected: list, mask: np.ndarray, past: int) -> dict[str, float]:
    names = list(graph)
    diffs = {}
    for name, want in zip(names, expected):
        got = graph[name]
        if got.dtype in (np.int8, np.uint8):
            continue  # a quantized KV cache's codes: what they hold is judged through the logits
        if got.shape != want.shape:
            raise CaptureError(f"parity check: output {name} has shape {got.shape} on ORT but {want.shape} in PyTorch")
        if not np.all(np.isfinite(got)):
            raise CaptureError(f"parity check: output {name} of the emitted graph has NaN or Inf")
        err = np.abs(got.astype(np.float32) - want)[_real_positions(name, np.empty(got.shape), mask, past)]
        diffs[name] = float(err.max()) if err.size else 0.0
    return diffs


def _per_layer(diffs: dict) -> list[float]:
    """The largest cache difference of each layer, over cases and key/value."""
    layers: dict[int, float] = {}
    for case in diffs.values():
        for name, value in case.items():
            if name.startswith("present."):
                layer = int(name.split(".")[1])
                layers[layer] = max(layers.get(layer, 0.0), value)
    return [layers[k] for k in sorted(layers)]
