"""The compile-time parity check: the emitted ONNX model on ONNX Runtime against the PyTorch module.

Every compile from a torch source ends with it, so an artifact that exists has been measured against
PyTorch at least once, at both prefill and decode shapes for causal LMs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...errors import CaptureError
from ...runtimes.cpu_bf16 import cpu_model
from ...runtimes.ort_compat import session_options
from ..capture.torch_export import Captured, decoder_example, decoder_io_names
from ..sources.resolve import CAUSAL_LM
from .step_io import run_step

FP32_ATOL = 1e-4  # DESIGN.md: fp32 logits within 1e-4 of PyTorch
# The two shapes a step graph serves: a prompt with an empty cache, then one token on top of a cache.
DECODER_CASES = (("prefill", dict(batch=2, seq=7, past=0)), ("decode", dict(batch=2, seq=1, past=6)))


def _flatten(x):
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flatten(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _flatten(item)]
    if hasattr(x, "to_tuple"):
        return _flatten(x.to_tuple())
    return []


def _compare(session, reference, args, kwargs, input_names=None, valid=None) -> dict:
    import torch

    with torch.no_grad():
        expected = _flatten(reference(*args, **(kwargs or {})))
    flat_inputs = _flatten(list(args) + ([kwargs] if kwargs else []))
    graph_inputs = [i.name for i in session.get_inputs()]
    # The exporter drops inputs the module never reads (position_ids on some models), so match by name
    # where the names are known.
    names = input_names or graph_inputs
    if len(names) != len(flat_inputs):
        raise CaptureError(f"parity check: graph has {len(names)} inputs, the torch module {len(flat_inputs)}")
    feeds = {n: t.detach().numpy() for n, t in zip(names, flat_inputs) if n in graph_inputs or n.startswith("past_")}
    produced = run_step(session, feeds)
    out_names = [o.name for o in session.get_outputs()]
    got = [produced[n] for n in out_names]
    diffs = {}
    for name, g, e in zip(out_names, got, expected):
        if g.dtype in (np.int8, np.uint8):
            continue  # a quantized KV cache's codes: what they hold is judged through the logits
        e = e.detach().float().numpy()
        if g.shape != e.shape:
            raise CaptureError(f"parity check: output {name} has shape {g.shape} on ORT but {e.shape} in PyTorch")
        if not np.all(np.isfinite(g)):
            raise CaptureError(f"parity check: output {name} of the emitted graph has NaN or Inf")
        err = np.abs(g.astype(np.float32) - e)
        if valid is not None:
            err = err[valid(name, err)]
        diffs[name] = float(np.max(err)) if err.size else 0.0
    return diffs


def buffer_positions(args):
    """``decoder_example``'s inputs with every row's positions numbered by KV buffer index (past + s).

    A graph without a position_ids input that rotates q and k inside GroupQueryAttention (pack-qkv) numbers
    positions that way; for left-padded rows it differs from transformers' count of real tokens by one
    constant per row, which leaves every attention score (RoPE depends on position differences only) and so
    the logits unchanged, but not the keys in the cache. The reference is fed the graph's numbering so the
    cache is compared too. A model that reads no positions ignores them.
    """
    ids, mask, pos, kvs = args
    past = mask.shape[1] - ids.shape[1]
    numbered = (past + np.arange(ids.shape[1], dtype=np.int64))[None].repeat(ids.shape[0], 0)
    return ids, mask, pos.new_tensor(numbered), kvs


def _real_positions(name: str, err: np.ndarray, mask: np.ndarray, past: int) -> np.ndarray:
    # A padding query attends to nothing; what it computes is unspecified and never read (its key/value
    # are masked out for every real token). Compare real positions only.
    if name == "logits":
        return np.broadcast_to(mask[:, past:, None], err.shape)
    return np.broadcast_to(mask[:, None, :, None], err.shape)


def check_parity(captured: Captured, model_path: Path, vocab: int | None = None, precision: str = "fp32") -> dict:
    """Run ``model_path`` on ORT (graph optimizations on, as served) and PyTorch; fail above 1e-4.

    A reduced-precision artifact is not held to 1e-4 (its quality is measured by task metrics: --eval);
    its difference is reported, and a NaN or Inf anywhere fails the compile.
    """
    session = ort.InferenceSession(cpu_model(model_path), session_options(), providers=["CPUExecutionProvider"])
    cases = {}
    if captured.kind == CAUSAL_LM:
        kv = captured.kv
        # an int8/int4 cache cannot take the decode case's random float past (its scales live in the graph):
        # its prefill is compared (a prompt reads back the quantized keys and values it wrote), quality by --eval
        quantized = any(i.type in ("tensor(int8)", "tensor(uint8)") for i in session.get_inputs())
        numbered_by_buffer = "position_ids" not in {i.name for i in session.get_inputs()}
        for label, shape in DECODER_CASES[:1] if quantized else DECODER_CASES:
            args = decoder_example(kv, vocab=vocab or 8, seed=17, **shape)
            args = buffer_positions(args) if numbered_by_buffer else args
            mask = args[1].numpy().astype(bool)
            cases[label] = _compare(
                session, captured.reference, args, None, decoder_io_names(kv.num_layers)[0],
                valid=lambda name, err, mask=mask, past=shape["past"]: _real_positions(name, err, mask, past),
            )
    else:
        args, kwargs = captured.example
        cases["example"] = _compare(session, captured.reference, args, kwargs)
    worst = max((d for case in cases.values() for d in case.values()), default=0.0)
    tolerance = FP32_ATOL if precision == "fp32" else None
    report = {
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "cases": {k: max(v.values(), default=0.0) for k, v in cases.items()},
        "passed": tolerance is None or worst <= tolerance,
    }
    if tolerance is None:
        report["note"] = f"{precision}: no NaN/Inf; quality is measured by perplexity (--eval), not by 1e-4"
    if not report["passed"]:
        where = max(((c, n, d) for c, v in cases.items() for n, d in v.items()), key=lambda t: t[2])
        raise CaptureError(
            f"parity check failed: output {where[1]} ({where[0]}) differs from PyTorch by {where[2]:.3g} "
            f"> {FP32_ATOL}; rerun with --opt-level 0 to see whether a pass is at fault"
        )
    return report
