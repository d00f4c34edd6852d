"""Calibration on a streamed compile, one region's weights at a time: GPTQ's Hessians and the KV cache's ranges.

GPTQ: each layer's Hessians are collected when its quantized weights are written.

The whole-model path runs the calibration windows through the fp32 graph once and keeps X^T X of every
quantized MatMul's input; at 8B that is gigabytes per layer (a 14336-wide down projection's alone is 1.6 GB in
float64). Here quantize-weights gets `LayerHessians` in place of that dict: ``get(input)`` hands a weight a
callable, and its bytes (computed as the artifact is written, layer after layer) ask for the Hessian's factor
only then (computed once for the weights that read one input: Q, K and V; gate and up).
The windows advance through the fp32 graph (a structural copy taken before quantization, its weights still lazy)
one region at a time, and only the current region's Hessians are held; a request for an earlier region starts
the windows over. The statistics are the whole-model path's: X^T X / tokens of the same inputs on the same
windows (GPTQ calibrates every layer on fp32 activations there too).

An int8/int4 KV cache: `layer_kv_ranges` runs the windows through the graph the kv-cache stage rewrites (after
the precision stage: quantized weights computed as each region is written to its scratch file) region by region,
and keeps of every layer's present key and value only its largest |x| per (KV head, channel): the whole-model
path's collect_kv_ranges (quality/calibration.py), which runs the same windows through one session of the whole
graph. A maximum does not depend on the order it is taken in, so the two agree exactly when the regions compute
the caches the whole graph computes.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from ...passes.gptq import HessianFactor, SharedFactors
from .quality import window_feeds
from .regions import RegionRunner

_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


class LayerHessians:
    """``get(input name)`` -> a callable giving that MatMul input's Hessian (None for other names)."""

    def __init__(self, fp32_model: ir.Model, windows: list[list[int]], say=lambda message: None):
        self.model = fp32_model.clone()  # quantize-weights rewrites the original in place
        self.runner = RegionRunner(self.model)
        self.windows, self.say = windows, say
        self.targets: dict[str, tuple[int, ir.Value]] = {}
        for region in self.runner.order:
            for node in self.runner.region_nodes(region):
                weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
                if weight is not None and weight.const_value is not None and len(weight.const_value.shape) == 2:
                    self.targets[node.inputs[0].name] = (region, node.inputs[0])
        self.tokens = sum(len(ids) for ids in windows)
        self._steps = None
        self._held: list[dict[str, np.ndarray]] = []  # the windows' values crossing between regions
        self._region = None
        self._done = SharedFactors({})
        self._pending: dict[str, np.ndarray] = {}

    def __bool__(self) -> bool:
        return bool(self.targets)

    def get(self, name: str):
        return (lambda: self.factor(name)) if name in self.targets else None

    def factor(self, name: str) -> HessianFactor:
        """The factor of ``name``'s Hessian, X^T X / tokens (once for the weights that share the input)."""
        region = self.targets[name][0]
        if self._region is None or region < self._region:
            self._restart()
        while self._region != region:
            self._region = next(self._steps)
            self._done = SharedFactors({x: np.divide(h, self.tokens, out=h) for x, h in self._pending.items()})
            self._pending = {}
        return self._done.factor(name)

    def _restart(self) -> None:
        self._held = [window_feeds(self.model.graph, ids) for ids in self.windows]
        watched = {region: [v for r, v in self.targets.values() if r == region] for region in self.runner.order}
        # keep_outputs=False: only the MatMul inputs are wanted; kept, every window's logits and KV caches would
        # pile up as the windows advance (16 windows of 256 tokens at the 1B shape: 2.1 GB of logits alone)
        self._steps = self.runner.steps(self._held, watch=lambda region: watched[region], seen=self._accumulate,
                                        keep_outputs=False)
        self._region, self._pending = None, {}

    def _accumulate(self, region: int, batch: int, values: dict[str, np.ndarray]) -> None:
        if batch % 8 == 0:
            self.say(f"calibrating: region {region + 2} of {len(self.runner.order)}, window {batch + 1}/{len(self.windows)}")
        for name, (target, _) in self.targets.items():
            if target == region and name in values:
                x = values[name].astype(np.float64).reshape(-1, values[name].shape[-1])
                self._pending[name] = self._pending.get(name, 0) + x.T @ x


def layer_kv_ranges(model: ir.Model, windows: list[list[int]], say=lambda message: None) -> dict[int, tuple]:
    """Per layer the largest |key| and |value| of every (KV head, channel) on ``windows``, as collect_kv_ranges
    measures them, with one region's weights in memory at a time: {layer: ([kv_heads, head_dim], same)}."""
    runner = RegionRunner(model)
    ranges: dict[int, list] = {}

    def seen(region: int, batch: int, values: dict[str, np.ndarray]) -> None:
        for name, array in values.items():
            match = _PRESENT.match(name)
            if match:  # a shared-buffer (GQA) cache comes back capacity-sized: the window's positions only
                found = np.abs(array[:, :, :len(windows[batch])].astype(np.float32)).max(axis=(0, 2))
                pair = ranges.setdefault(int(match.group(1)), [None, None])
                kind = 0 if match.group(2) == "key" else 1
                pair[kind] = found if pair[kind] is None else np.maximum(pair[kind], found)

    held = [window_feeds(model.graph, ids) for ids in windows]
    for region in runner.steps(held, seen=seen, keep_outputs=False):  # caches and logits dropped once seen
        say(f"calibrating the KV cache: region {region + 2} of {len(runner.order)}")
    return {layer: (pair[0], pair[1]) for layer, pair in sorted(ranges.items())}
