"""The KV cache: preallocated once per generate call, written by the graph, never copied by Python.

Shared-buffer graphs (fuse-gqa: GroupQueryAttention with past_present_share_buffer) get one buffer per layer
and kind, [batch, heads, capacity, dim], bound as both past and present: attention writes the new tokens
in place and nothing is copied at all.

Concat graphs (the captured form) read ``past`` [batch, heads, past, dim] and writes ``present`` [batch, heads, past + new,
dim]. Each layer owns two flat buffers sized for the whole generation; a prefix of a flat buffer is a
contiguous [batch, heads, n, dim] array, so the past is bound as a view of one buffer and the present as
a view of the other, and the two swap roles every step. ORT writes present straight into our memory
(IO binding); the only copy is the graph's own Concat, which the attention fusion's shared-buffer mode
removes.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    """Ping-pong KV buffers for ``layers`` = [(kv_heads, head_dim), ...] at a fixed batch and capacity."""

    def __init__(self, batch: int, capacity: int, layers: list[tuple[int, int]], dtype=np.float32, shared=False):
        self.batch, self.capacity, self.layers, self.shared = batch, capacity, layers, shared
        # buffers[side][layer][0 = key, 1 = value]; a shared cache has one side
        self.buffers = [
            [[np.zeros(batch * h * capacity * d, dtype=dtype) for _ in range(2)] for h, d in layers]
            for _ in range(1 if shared else 2)
        ]
        self.read_side = 0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for side in self.buffers for layer in side for b in layer)

    def _view(self, side: int, layer: int, kind: int, length: int) -> np.ndarray:
        heads, dim = self.layers[layer]
        flat = self.buffers[side][layer][kind]
        return flat[: self.batch * heads * length * dim].reshape(self.batch, heads, length, dim)

    def past(self, layer: int, kind: int, length: int) -> np.ndarray:
        return self._view(self.read_side, layer, kind, length)

    def present(self, layer: int, kind: int, length: int) -> np.ndarray:
        """The write side of a concat cache (a shared cache is bound once, through ``past``)."""
        return self._view(1 - self.read_side, layer, kind, length)

    def swap(self) -> None:
        """After a step: what was written becomes the next step's past (a shared cache already is)."""
        if not self.shared:
            self.read_side = 1 - self.read_side
