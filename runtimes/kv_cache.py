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
it, e.g. CUDA OrtValues, without touching the bookkeeping). An allocator that can give memory back
(runtimes/kv_memory.py's ReservedMemory: reserved address space, pages committed where positions are written)
makes the cache release every page past a slot's length whenever the slot shrinks, so the memory a slot
holds is ``blocks(slot) = ceil(length / block_tokens)`` blocks, ``block_bytes`` each; the buffers' position
dimension is then rounded up to whole blocks.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .kv_memory import block_positions


def numpy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


class SlotKVCache:
    """``num_slots`` sequences of up to ``capacity`` positions for ``layers`` = [(kv_heads, head_dim), ...]."""

    def __init__(self, num_slots: int, capacity: int, layers: list[tuple[int, int]], dtype=np.float32,
                 allocate: Callable = numpy_zeros):
        self.num_slots, self.capacity, self.layers, self.dtype = num_slots, capacity, list(layers), dtype
        self._release = getattr(allocate, "release", None)
        itemsize = np.dtype(dtype).itemsize
        self.block_tokens = block_positions([d * itemsize for _, d in self.layers]) if self._release else 1
        self.rows = -(-capacity // self.block_tokens) * self.block_tokens  # the buffers' position dimension
        # buffers[layer][0 = key, 1 = value]
        self.buffers = [[allocate((num_slots, h, self.rows, d), dtype) for _ in range(2)] for h, d in self.layers]
        self._written = np.zeros(num_slots, dtype=np.int64)  # the most positions a slot held since its last release
        self.lengths = np.zeros(num_slots, dtype=np.int64)  # positions written (left padding included)
        self.mask = np.zeros((num_slots, capacity), dtype=np.int64)  # 1 = a real token at that position
        self.tokens: list[list[int]] = [[] for _ in range(num_slots)]  # ids at the real positions, in order

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for layer in self.buffers for b in layer)

    @property
    def bytes_per_token(self) -> int:
        return self.nbytes // (self.num_slots * self.rows)

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.bytes_per_token

    def blocks(self, positions: int) -> int:
        """Blocks that ``positions`` positions of one slot occupy."""
        return -(-int(positions) // self.block_tokens)

    def release_beyond(self, slot: int, positions: int) -> None:
        """Give back the memory of ``slot``'s blocks past the first ``positions`` positions' (no-op for memory
        that cannot be given back)."""
        keep = self.blocks(positions) * self.block_tokens
        if self._release is None or self.blocks(self._written[slot]) * self.block_tokens <= keep:
            return
        for (heads, dim), layer in zip(self.layers, self.buffers):
            row = dim * layer[0].itemsize
            for buffer in layer:
                if keep == 0:  # the slot's whole region, one call
                    self._release(buffer, slot * heads * self.rows * row, heads * self.rows * row)
                    continue
                for head in range(heads):
                    start = ((slot * heads + head) * self.rows + keep) * row
                    self._release(buffer, start, (self.rows - keep) * row)
        self._written[slot] = positions

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
            self._written[slot] = max(self._written[slot], length + width)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions of ``slot`` (a rollback: later positions will be overwritten)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions; cannot truncate to {length}")
        self.mask[slot, length:] = 0
        self.tokens[slot] = self.tokens[slot][: int(self.mask[slot, :length].sum())]
        self.lengths[slot] = length
        self.release_beyond(slot, length)

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
        self._written[dst] = max(self._written[dst], length)
        self.release_beyond(dst, length)

    def swap(self, a: int, b: int) -> None:
        """Exchange two slots' contents (only the positions each holds are moved)."""
        if a == b:
            return
        len_a, len_b = int(self.lengths[a]), int(self.lengths[b])
        for layer in self.buffers:
            for buffer in layer:
                held = buffer[a, :, :len_a].copy()
                buffer[a, :, :len_b] = buffer[b, :, :len_b]
                buffer[b, :, :len_a] = held
        self.mask[[a, b]] = self.mask[[b, a]]
        self.lengths[[a, b]] = self.lengths[[b, a]]
        self.tokens[a], self.tokens[b] = self.tokens[b], self.tokens[a]
        self._written[a], self._written[b] = max(self._written[a], len_b), max(self._written[b], len_a)
        for slot in (a, b):  # a slot that held more than it now does gives the rest back
            self.release_beyond(slot, int(self.lengths[slot]))

    def export(self, slot: int) -> dict:
        """A host copy of what ``slot`` holds (a preempted request's KV), for ``restore``."""
        length = int(self.lengths[slot])
        return {"length": length, "mask": self.mask[slot, :length].copy(), "tokens": list(self.tokens[slot]),
                "kv": [buffer[slot, :, :length].copy() for layer in self.buffers for buffer in layer]}

    def restore(self, slot: int, saved: dict) -> None:
        """Make ``slot`` hold what ``export`` copied (into any slot of a cache of the same layout)."""
        length = saved["length"]
        self.clear(slot)
        arrays = iter(saved["kv"])
        for layer in self.buffers:
            for buffer in layer:
                buffer[slot, :, :length] = next(arrays)
        self.mask[slot, :length] = saved["mask"]
        self.tokens[slot] = list(saved["tokens"])
        self.lengths[slot] = length
        self._written[slot] = max(self._written[slot], length)
