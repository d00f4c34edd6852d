"""Calibration and evaluation text: token windows, and what a decoder graph computes on them.

`--calib FILE` feeds GPTQ (the Hessian X^T X of every quantized MatMul's input, collected on the
optimized fp32 graph); `--eval FILE` measures perplexity before and after quantization. Both take text
(tokenized with the model's own tokenizer) or token ids (a .json list of lists of ints).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tokenizers import Tokenizer

from ...errors import SourceError, UsageError
from ...runtimes.cpu_bf16 import cpu_model
from ...runtimes.ort_compat import session_options
from .step_io import run_step

_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
WINDOW = 256  # tokens per calibration / evaluation window (fewer when the artifact's max_seq_len is smaller)
MAX_CALIB_WINDOWS = 64  # 16k tokens: GPTQ's Hessians settle long before this on models this size


def load_tokenizer(src, tm):
    """The `tokenizers.Tokenizer` of a source, or None."""
    if tm is not None and tm.tokenizer is not None:
        return tm.tokenizer
    for folder in (getattr(tm, "tokenizer_dir", None), src.path.parent if src.kind == "onnx" else None):
        if folder is not None and (Path(folder) / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return None


def token_windows(path: str | Path, tokenizer, window: int, max_windows: int | None = None,
                  flag: str = "--calib") -> tuple[list[list[int]], int]:
    """(windows, prefix) from a text or token-id file; each window starts with ``prefix`` special tokens.

    Text is tokenized once and cut into consecutive windows; every window gets the tokenizer's own
    prefix (``<bos>`` for Llama-style tokenizers, nothing for GPT-2), so windows are independent sequences.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
            if rows and isinstance(rows[0], int):
                rows = [rows]
            rows = [[int(t) for t in row] for row in rows]
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{flag} {path}: expected a JSON list of lists of token ids ({exc})") from None
        windows = [row[i:i + window] for row in rows for i in range(0, len(row), window)]
        prefix = 0
    else:
        if tokenizer is None:
            raise UsageError(f"{flag} {path} is text but the model has no tokenizer.json; pass token ids as .json")
        text = path.read_text(encoding="utf-8")
        prefix_ids = tokenizer.encode("").ids
        body = tokenizer.encode(text, add_special_tokens=False).ids
        step = window - len(prefix_ids)
        windows = [prefix_ids + body[i:i + step] for i in range(0, len(body), step)]
        prefix = len(prefix_ids)
    windows = [w for w in windows if len(w) - prefix >= 2]
    if not windows:
        raise UsageError(f"{flag} {path}: no tokens in it")
    return windows[:max_windows] if max_windows else windows, prefix


def decoder_feeds(session, ids: list[int]) -> dict[str, np.ndarray]:
    """Concat-form feeds for one sequence with an empty cache (run_step adapts them to the graph's form)."""
    types = {i.name: i.type for i in session.get_inputs()}
    feeds = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        "position_ids": np.arange(len(ids), dtype=np.int64)[None],
    }
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            heads, dim = inp.shape[1], inp.shape[3]
            dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}.get(
                types[inp.name], np.float32)
            feeds[inp.name] = np.zeros((1, heads, 0, dim), dtype=dtype)
    return feeds


def _session(model: ir.Model, extra_outputs: list[ir.Value] = ()):
    proto = ir.serde.serialize_model(model)
    for value in extra_outputs:
        proto.graph.output.append(ir.serde.serialize_value(value))
    with tempfile.TemporaryDirectory(prefix="luffy-calib-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(proto, path, save_as_external_data=True, location="model.onnx.data")
        options = session_options()
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def collect_hessians(model: ir.Model, windows: list[list[int]], say=lambda m: None) -> dict[str, np.ndarray]:
    """X^T X / tokens for the activation input of every MatMul with a constant 2-D weight, by input name."""
    inputs = {}
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].const_value is not None \
                and len(node.inputs[1].const_value.shape) == 2:
            inputs[node.inputs[0].name] = node.inputs[0]
    if not inputs:
        return {}
    graph_outputs = {v.name for v in model.graph.outputs}
    session = _session(model, [v for name, v in inputs.items() if name not in graph_outputs])
    hessians: dict[str, np.ndarray] = {}
    tokens = 0
    for i, ids in enumerate(windows):
        if i % 8 == 0:
            say(f"calibrating: window {i + 1}/{len(windows)}")
        produced = run_step(session, decoder_feeds(session, ids))
        for name in inputs:
            x = produced[name].astype(np.float64).reshape(-1, produced[name].shape[-1])
            hessians[name] = hessians.get(name, 0) + x.T @ x
        tokens += len(ids)
    if tokens == 0:
        raise SourceError("calibration produced no tokens")
    return {name: h / tokens for name, h in hessians.items()}


def collect_kv_ranges(model: ir.Model, windows: list[list[int]], say=lambda m: None) -> dict[int, tuple]:
    """Per layer, the largest |key| and |value| of every (KV head, channel) on ``windows``: [kv_heads, head_dim]
    each, what an int8/int4 KV cache's static per-channel scales are made from (passes/kv_cache_dtype.py)."""
    session = _session(model)
    ranges: dict[int, list] = {}
    for i, ids in enumerate(windows):
        if i % 8 == 0:
            say(f"calibrating the KV cache: window {i + 1}/{len(windows)}")
        for name, array in run_step(session, decoder_feeds(session, ids)).items():
            match = _PRESENT.match(name)
            if match:
                found = np.abs(array.astype(np.float32)).max(axis=(0, 2))
                kind = 0 if match.group(2) == "key" else 1
                pair = ranges.setdefault(int(match.group(1)), [None, None])
                pair[kind] = found if pair[kind] is None else np.maximum(pair[kind], found)
    return {layer: (pair[0], pair[1]) for layer, pair in ranges.items()}


def graph_perplexity(model_path: Path, windows: list[list[int]], prefix: int) -> float:
    """Perplexity of a decoder step graph on ``windows`` (logits at every position, empty cache)."""
    session = ort.InferenceSession(cpu_model(model_path), session_options(), providers=["CPUExecutionProvider"])
    return _perplexity((run_step(session, decoder_feeds(session, ids))["logits"][0] for ids in windows), windows, prefix)


LOGITS_BATCH_BYTES = 256 << 20  # a batch's fp32 logits: 8 windows of 256 at a 32k vocabulary, 2 at Llama 3's 128k
MAX_BATCH_WINDOWS = 16  # and at most 4k tokens of activations per forward, whatever the vocabulary


def torch_perplexity(module, windows: list[list[int]], prefix: int) -> float:
    """Perplexity of the PyTorch module on ``windows``, scored as graph_perplexity scores them. Windows of one
    length run as one batch (up to LOGITS_BATCH_BYTES of logits): one forward per window costs the module's
    per-call overhead each time (94 windows of a small model: 7 s one at a time)."""
    import torch

    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    # a module without a config (a factory's) runs one window at a time
    per_batch = min(MAX_BATCH_WINDOWS, LOGITS_BATCH_BYTES // (4 * vocab * max(map(len, windows)))) if vocab else 1

    def logits():
        with torch.no_grad():
            for batch in _equal_length_batches(windows, per_batch):
                yield from module(input_ids=torch.tensor(batch)).logits.float().numpy()

    return _perplexity(logits(), windows, prefix)


def _equal_length_batches(windows: list[list[int]], most: int):
    """``windows`` in order, as runs of at most ``most`` (at least 1) windows of one length."""
    batch: list[list[int]] = []
    for ids in windows:
        if batch and (len(ids) != len(batch[0]) or len(batch) >= max(most, 1)):
            yield batch
            batch = []
        batch.append(ids)
    if batch:
        yield batch


def _perplexity(logits_per_window, windows, prefix: int) -> float:
    nll, count = 0.0, 0
    for logits, ids in zip(logits_per_window, windows):
        start = max(prefix, 1)  # the first token has no prediction unless a prefix token precedes it
        lg = logits[start - 1:len(ids) - 1].astype(np.float64)
        lg -= lg.max(axis=-1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
        targets = np.array(ids[start:])
        nll -= logp[np.arange(len(targets)), targets].sum()
        count += len(targets)
    return float(np.exp(nll / count))
