"""Run a decoder step graph on ONNX Runtime from concat-style feeds, whatever KV interface it has.

The captured graph takes past [B, H, past, d] and returns present [B, H, past + new, d]. After fuse-gqa the
same graph takes capacity-sized buffers that are both past and present, plus seqlens_k and
total_sequence_length. Parity and --verify compare both forms against the same references, so this turns
one set of feeds into the other and returns presents trimmed back to [B, H, past + new, d].
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort

SEQLENS, TOTAL, KEEP, QUERY_SEQLENS = "seqlens_k", "total_sequence_length", "logits_to_keep", "query_seqlens"
INDICES = "logits_indices"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_CACHE_TYPES = {"tensor(float16)": np.float16, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
EXTRA_CAPACITY = 3  # buffers a little longer than needed, so a graph that confuses capacity with length fails


def interface_feeds(inputs: dict[str, str], feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """(feeds in the graph's own form, total length) for concat-form ``feeds``, without io binding: a shared-buffer
    (GQA) graph gets capacity-sized past buffers, seqlens_k and total_sequence_length; its presents come back
    buffer-sized, to be cut to ``total``. ``inputs`` maps the graph's input names to their ONNX type strings."""
    feeds = _graph_feeds(inputs, feeds)
    batch, new = feeds["input_ids"].shape
    total = feeds["attention_mask"].shape[1]
    if SEQLENS not in inputs:
        return feeds, total
    for name, array in list(feeds.items()):
        if _PAST.match(name):
            b, heads, past, dim = array.shape
            buffer = np.zeros((b, heads, total + EXTRA_CAPACITY, dim), dtype=array.dtype)
            buffer[:, :, :past] = array
            feeds[name] = buffer
    feeds.update(_lengths(inputs, batch, new, total))
    return feeds, total


def _graph_feeds(inputs: dict[str, str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` the graph takes, caches in the graph's dtype, and the inputs a reference run leaves out: every
    position's logits kept (logits_to_keep, logits_indices)."""
    feeds = {k: v for k, v in feeds.items() if k in inputs or _PAST.match(k)}
    for name, array in feeds.items():  # fp16 / int8 caches; references come in fp32
        want = _CACHE_TYPES.get(inputs.get(name))
        if want is not None and array.dtype != want:
            if want in (np.int8, np.uint8) and array.size:
                raise ValueError(f"{name}: a float past cannot be fed to an {inputs[name]} cache (its scales live "
                                 "in the graph); start from an empty cache")
            feeds[name] = array.astype(want)
    if KEEP in inputs and KEEP not in feeds:  # keep-last-logits graphs: compare every position
        feeds[KEEP] = np.array(feeds["input_ids"].shape[1], dtype=np.int64)
    if INDICES in inputs and INDICES not in feeds:
        rows, width = feeds["input_ids"].shape
        feeds[INDICES] = np.broadcast_to(np.arange(width, dtype=np.int64), (rows, width)).copy()
    return feeds


def _lengths(inputs: dict[str, str], batch: int, new: int, total: int) -> list[tuple[str, np.ndarray]]:
    """A shared-buffer graph's length inputs when every row holds ``total`` tokens, ``new`` of them fed now."""
    lengths = [(SEQLENS, np.full(batch, total - 1, np.int32)), (TOTAL, np.array(total, np.int32))]
    if QUERY_SEQLENS in inputs:  # multi-row graphs: every row's new tokens are all valid
        lengths.append((QUERY_SEQLENS, np.full(batch, new, np.int32)))
    return lengths


def run_step(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name for ``feeds`` given in the captured (concat) form."""
    inputs = {i.name: i.type for i in session.get_inputs()}
    shapes = {i.name: i.shape for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    feeds = _graph_feeds(inputs, feeds)
    if SEQLENS not in inputs:
        return dict(zip(names, session.run(None, feeds)))
    batch, new = feeds["input_ids"].shape
    total = feeds["attention_mask"].shape[1]
    binding = session.io_binding()
    keep, presents = [], {}
    for name, array in feeds.items():
        m = _PAST.match(name)
        if m:
            b, heads, past, dim = array.shape
            dim = shapes[name][3] if isinstance(shapes[name][3], int) else dim  # an int4 cache packs two per byte
            buffer = np.zeros((b, heads, total + EXTRA_CAPACITY, dim), dtype=array.dtype)
            if past:
                buffer[:, :, :past] = array
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(name, value)
            presents[f"present.{m.group(1)}.{m.group(2)}"] = (buffer, value)
        else:
            # np.require keeps 0-d scalars 0-d (np.ascontiguousarray would make them [1])
            value = ort.OrtValue.ortvalue_from_numpy(np.require(array, requirements="C"))
            binding.bind_ortvalue_input(name, value)
        keep.append(value)
    for name, array in _lengths(inputs, batch, new, total):
        value = ort.OrtValue.ortvalue_from_numpy(array)
        keep.append(value)
        binding.bind_ortvalue_input(name, value)
    for name in names:  # in the session's order: copy_outputs_to_cpu returns them in binding order
        if name in presents:
            binding.bind_ortvalue_output(name, presents[name][1])  # the very buffer bound as past
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    produced = dict(zip(names, binding.copy_outputs_to_cpu()))
    for name, (buffer, _) in presents.items():
        produced[name] = buffer[:, :, :total]
    return produced
