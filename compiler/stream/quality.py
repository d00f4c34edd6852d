"""--eval on a streamed compile: perplexity of a graph computed region by region (regions.py).

The fp32 reference is the optimized fp32 graph before the precision passes (its weights still lazy: each
region's are written to a scratch directory while it runs), the result is the artifact itself; both hold one
region's weights and one window's logits at a time. (The whole-model path measures the reference in PyTorch; the
streamed path cannot hold the model in PyTorch, and its fp32 graph is what the fp32 compile checks against
PyTorch to 1e-4.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..quality.calibration import _perplexity
from ..quality.step_io import interface_feeds
from .regions import RegionRunner

ONNX_TYPES = {ir.DataType.FLOAT: "tensor(float)", ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.INT64: "tensor(int64)",
              ir.DataType.INT32: "tensor(int32)", ir.DataType.INT8: "tensor(int8)", ir.DataType.UINT8: "tensor(uint8)"}


def window_feeds(graph: ir.Graph, ids: list[int]) -> dict[str, np.ndarray]:
    """One window with an empty cache, in the graph's own input form."""
    feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    for value in graph.inputs:
        if value.name.startswith("past_key_values."):
            heads, dim = value.shape[1], value.shape[3]
            dtype = np.float16 if value.dtype == ir.DataType.FLOAT16 else np.float32
            feeds[value.name] = np.zeros((1, heads, 0, dim), dtype=dtype)
    names = {v.name: ONNX_TYPES.get(v.dtype, "") for v in graph.inputs}
    return interface_feeds(names, feeds)[0]


def region_perplexity(runner: RegionRunner, windows: list[list[int]], prefix: int, say=lambda message: None) -> float:
    """Perplexity of ``runner``'s graph on ``windows``, scored as calibration.graph_perplexity scores them."""
    logits: dict[int, np.ndarray] = {}

    def finish(index: int, outputs: dict) -> None:  # keep one window's log-likelihood, not its logits
        logits[index] = _perplexity_terms(outputs["logits"][0], windows[index], prefix)

    runner.run([window_feeds(runner.graph, ids) for ids in windows],
               lambda r: say(f"perplexity: region {r + 2} of {len(runner.order)}"), finish=finish)
    nll = sum(v[0] for v in logits.values())
    count = sum(v[1] for v in logits.values())
    return float(np.exp(nll / count))


def _perplexity_terms(logits: np.ndarray, ids: list[int], prefix: int) -> tuple[float, int]:
    """(negative log-likelihood, tokens scored) of one window, as calibration._perplexity sums them."""
    ppl = _perplexity([logits], [ids], prefix)
    start = max(prefix, 1)
    count = len(ids) - start
    return float(np.log(ppl) * count), count
