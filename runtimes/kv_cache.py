"""The slot KV cache: allocated once, one slot of rows per sequence, written in place by the graph.

Per layer and kind (key, value) one buffer ``[num_slots, kv_heads, capacity, head_dim]``. A slot's rows are
contiguous, so any run of slots ``[start, stop)`` is a view the graph takes without a copy. Per slot the
cache keeps its length (positions written), the attention mask over those positions (0 where a batch was
left-padded) and the tokens that fill them (what a prefix cache compares). Slots can be truncated (roll
back rejected draft tokens), copied (share a cached prefix) and swapped (keep the decoding slots first).

Shared-buffer graphs (fuse-gqa's GroupQueryAttention) bind a slot view as both past and present and write
each new position at the row's own length: nothing is copied. Concat graphs (the captured form) read a
contiguous past and return past + new; the stepper copies the past out and the new positions back (see
ort.py), which is what those graphs' own Concat costs anyway.

``allocate(shape, dtype)`` is the one place memory comes from (numpy here; a device allocator can replace
it, e.g. CUDA OrtValues, without touching the bookkeeping).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def numpy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


class SlotKVCache:
    """``num_slots`` sequences of up to ``capacity`` positions for ``layers`` = [(kv_heads, head_dim), ...]."""

    def __init__(self, num_slots: int, capacity: int, layers: list[tuple[int, int]], dtype=np.float32,
                 allocate: Callable = numpy_zeros):
        self.num_slots, self.capacity, self.layers, self.dtype = num_slots, capacity, list(layers), dtype
        # buffers[layer][0 = key, 1 = value]
        self.buffers = [[allocate((num_slots, h, capacity, d), dtype) for _ in range(2)] for h, d in self.layers]
        self.lengths = np.zeros(num_slots, dtype=np.int64)  # positions written (left padding included)
        self.mask = np.zeros((num_slots, capacity), dtype=np.int64)  # 1 = a real token at that position
        self.tokens: list[list[int]] = [[] for _ in range(num_slots)]  # ids at the real positions, in order

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for layer in self.buffers for b in layer)

    @property
    def bytes_per_token(self) -> int:
        return self.nbytes // (self.num_slots * self.capacity)

    def view(self, layer: int, kind: int, start: int, stop: int):
        """Slots [start, stop) of one layer's key (0) or value (1) buffer: [stop - start, heads, capacity, dim]."""
        return self.buffers[layer][kind][start:stop]

    def record(self, start: int, ids: np.ndarray, real: np.ndarray, counts=None) -> None:
        """Book ``ids`` [n, s] just written at each slot's end (``real`` 0 marks left padding); with ``counts``,
        only row r's first counts[r] columns (the rest is right padding, which the graph does not write)."""
        for row in range(ids.shape[0]):
            slot, length = start + row, int(self.lengths[start + row])
            width = ids.shape[1] if counts is None else int(counts[row])
            self.mask[slot, length:length + width] = real[row, :width]
            self.tokens[slot].extend(int(t) for t, r in zip(ids[row, :width], real[row, :width]) if r)
            self.lengths[slot] = length + width

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions of ``slot`` (a rollback: later positions will be overwritten)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions; cannot truncate to {length}")
        self.mask[slot, length:] = 0
        self.tokens[slot] = self.tokens[slot][: int(self.mask[slot, :length].sum())]
        self.lengths[slot] = length

    def clear(self, slot: int) -> None:
        self.truncate(slot, 0)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Make ``dst`` hold the first ``length`` positions of ``src`` (a shared prompt prefix)."""
        if not 0 <= length <= self.lengths[src]:
            raise ValueError(f"slot {src} holds {self.lengths[src]} positions; cannot copy {length}")
        for layer in self.buffers:
            for buffer in layer:
                buffer[dst, :, :length] = buffer[src, :, :length]
        self.mask[dst] = 0
        self.mask[dst, :length] = self.mask[src, :length]
        self.tokens[dst] = self.tokens[src][: int(self.mask[src, :length].sum())]
        self.lengths[dst] = length

    def swap(self, a: int, b: int) -> None:
        """Exchange two slots' contents (only the positions either holds are moved)."""
        if a == b:
            return
        used = int(max(self.lengths[a], self.lengths[b]))
        for layer in self.buffers:
            for buffer in layer:
                held = buffer[a, :, :used].copy()
                buffer[a, :, :used] = buffer[b, :, :used]
                buffer[b, :, :used] = held
        self.mask[[a, b]] = self.mask[[b, a]]
        self.lengths[[a, b]] = self.lengths[[b, a]]
        self.tokens[a], self.tokens[b] = self.tokens[b], self.tokens[a]
