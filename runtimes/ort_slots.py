"""One decoder step on ONNX Runtime over a run of KV slots: the primitive generate, score and the scheduler share.

``step(start, stop, ids, real)`` feeds ``ids`` [n, s] to slots [start, stop) of a SlotKVCache: each row's new
positions go after that slot's own length, positions and the attention mask follow from what the slot
already holds, and the logits of the last ``keep`` positions come back [n, keep, vocab]. Rows may hold
different lengths (continuous batching decodes them together, each with its own ``seqlens_k``).

A multi-token step with a cache (a chunk of a prompt, a speculative draft to verify) takes several rows when
the graph takes ``query_seqlens`` (fuse-gqa on onnxruntime >= 1.32): ``counts`` gives each row's tokens,
the rest of its row is right padding the graph neither attends to nor writes, and each row gets the logits
of its own last tokens. Other graphs take one such row per step (GroupQueryAttention without query_seqlens
reads a multi-token step with past only at batch 1), or several rows that all start empty.

Shared-buffer graphs write the new positions straight into the slot buffers (bound as past and present,
through IO binding, once per run of slots). Concat graphs need a contiguous past and return past + new, so
their rows must hold equal lengths; the past is copied out and the new positions copied back.
"""

from __future__ import annotations

import numpy as np

from ..errors import CapacityError, UsageError
from .generation import positions_from_mask
from .kv_cache import SlotKVCache, numpy_zeros
from .manifest import (ATTENTION_MASK, INDICES, INPUT_IDS, KEEP, LOGITS, POSITION_IDS, QUERY_SEQLENS, SEQLENS,
                       TOTAL)


class OrtSlots:
    """A SlotKVCache bound to one OrtEngine's session.

    >>> slots = engine.open_slots(num_slots=4, capacity=256)               # doctest: +SKIP
    >>> first = slots.step(0, 1, np.array([[256, 72, 105]]))[:, -1]        # prefill slot 0
    >>> nxt = slots.step(0, 1, first.argmax(-1)[:, None])[:, -1]           # one decode step
    """

    def __init__(self, engine, num_slots: int, capacity: int, allocate=numpy_zeros):
        self.engine = engine
        self.graph = engine.graph
        self.cache = SlotKVCache(num_slots, capacity, list(self.graph.layers), engine.kv_dtype, allocate)
        self._bindings: dict[tuple[int, int], tuple] = {}  # (start, stop) -> (IOBinding, KV OrtValues)
        self._logits = np.empty(0, dtype=np.float32)

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def step(self, start: int, stop: int, ids: np.ndarray, real: np.ndarray | None = None, keep: int | None = 1,
             counts=None):
        """Run one step over slots [start, stop); ``real`` [n, s] marks left padding with 0 (default: all real).

        ``counts`` [n] (multi-row graphs, ``graph.multi_row``): row r's tokens are ids[r, :counts[r]], the rest is
        right padding, and a row of 0 is idle (its slot must hold tokens). Without it every column is a token.

        Returns float32 logits [n, kept, vocab] for each row's last ``keep`` tokens (all positions when None), a
        view of a buffer the next step reuses: copy what must outlive it. A row with fewer tokens than ``keep``
        has them last, after copies of its first.
        """
        ids = np.asarray(ids, dtype=np.int64)
        n, width = ids.shape
        if not 0 <= start < stop <= self.num_slots or n != stop - start:
            raise UsageError(f"step over slots [{start}, {stop}) got {n} rows; the cache has {self.num_slots} slots")
        counts = np.full(n, width, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
        padded = bool((counts != width).any())
        if real is None:
            real = (np.arange(width)[None, :] < counts[:, None]).astype(np.int64)
        real = np.asarray(real, dtype=np.int64)
        lengths = self.cache.lengths[start:stop].copy()
        self._check_rows(lengths, counts, width, padded)
        total = int(lengths.max()) + width  # right padding needs room too (GroupQueryAttention: P + S <= C)
        if total > self.capacity:
            raise CapacityError(f"{total} positions exceed the KV slots' capacity {self.capacity}")
        if self.graph.positions_from_buffer:
            self._refuse_gaps(start, real)
        positions = self._positions(start, real) if self.graph.takes_positions else None
        self.cache.record(start, ids, real, counts if padded else None)
        kept = width if keep is None else min(keep, width)
        picked = np.maximum(counts[:, None] - kept + np.arange(kept), 0)  # each row's last `kept` tokens' columns
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ascontiguousarray(self.cache.mask[start:stop, :total])}
        if self.graph.takes_positions:
            feeds[POSITION_IDS] = positions
        if self.graph.picks_logits:
            feeds[INDICES] = picked
        elif self.graph.keeps_logits:
            feeds[KEEP] = np.array(kept, dtype=np.int64)
        chosen_by_graph = self.graph.picks_logits or self.graph.keeps_logits
        returned = kept if chosen_by_graph else width
        if self.graph.multi_row:
            feeds[QUERY_SEQLENS] = counts.astype(np.int32)
        if self.graph.shared_kv:
            feeds[SEQLENS] = (lengths + counts - 1).astype(np.int32)  # an idle row keeps its own
            feeds[TOTAL] = np.array(total, dtype=np.int32)
            logits = self._run_shared(start, stop, feeds, returned)
        else:
            logits = self._run_concat(start, stop, feeds, returned, int(lengths[0]), width)
        if not chosen_by_graph and keep is not None and (padded or kept < width):  # the graph gave every position
            logits = np.take_along_axis(logits, picked[:, :, None], axis=1)
        return logits

    def _check_rows(self, lengths: np.ndarray, counts: np.ndarray, width: int, padded: bool) -> None:
        if padded and not self.graph.multi_row:
            raise UsageError("right-padded rows need a graph that takes query_seqlens (a multi-row graph)")
        if ((counts < 0) | (counts > width)).any():
            raise UsageError(f"counts {counts.tolist()} must lie in [0, {width}]")
        if ((counts == 0) & (lengths == 0)).any():
            raise UsageError("an idle row (0 tokens) must be a slot that holds tokens")
        if width > 1 and len(lengths) > 1 and lengths.any() and not self.graph.multi_row:
            raise UsageError("a multi-token step with a cache takes one row at a time (GroupQueryAttention "
                             "without query_seqlens)")
        if not self.graph.shared_kv and (lengths != lengths[0]).any():
            raise UsageError("a concat-KV graph steps rows of equal length together; step these rows one at a time")

    def _refuse_gaps(self, start: int, real: np.ndarray) -> None:
        """A graph that numbers positions by buffer index (kv_cache.positions "buffer") equals transformers only
        while each row is padding, then real tokens, then (once finished) padding: no real token after a gap."""
        lengths = self.cache.lengths[start:start + real.shape[0]]
        ends_masked = (lengths > 0) & (self.cache.mask[start + np.arange(real.shape[0]), np.maximum(lengths - 1, 0)] == 0)
        if real.all() and not ends_masked.any():
            return  # the common case, decided without looking at whole rows
        for row in range(real.shape[0]):
            held = self.cache.mask[start + row, :lengths[row]]
            real_at = np.flatnonzero(np.concatenate([held, real[row]]))
            if real_at.size and real_at[-1] - real_at[0] + 1 != real_at.size:
                raise UsageError(f"slot {start + row}: a real token after a masked one inside the sequence; this "
                                 "artifact rotates by KV buffer position (kv_cache.positions = buffer), which equals "
                                 "transformers' numbering for left or right padding only")

    def _positions(self, start: int, real: np.ndarray) -> np.ndarray:
        # transformers' rule, continued from the real tokens each slot already holds
        before = np.array([[len(self.cache.tokens[start + row])] for row in range(real.shape[0])], dtype=np.int64)
        return positions_from_mask(real) + before * real

    def _logits_view(self, n: int, kept: int) -> np.ndarray:
        size = n * kept * self.graph.vocab
        if self._logits.size < size:
            self._logits = np.empty(size, dtype=np.float32)
        return self._logits[:size].reshape(n, kept, self.graph.vocab)

    def _binding(self, start: int, stop: int):
        if (start, stop) not in self._bindings:
            ort = self.engine._ort
            binding = self.engine.session.io_binding()
            values = []
            for layer, (past, present) in enumerate(zip(self.graph.past_names, self.graph.present_names)):
                for kind in (0, 1):
                    value = ort.OrtValue.ortvalue_from_numpy(self.cache.view(layer, kind, start, stop))
                    binding.bind_ortvalue_input(past[kind], value)
                    binding.bind_ortvalue_output(present[kind], value)
                    values.append(value)
            self._bindings[(start, stop)] = (binding, values)
        return self._bindings[(start, stop)][0]

    def _run_shared(self, start: int, stop: int, feeds: dict, kept: int) -> np.ndarray:
        binding = self._binding(start, stop)
        logits = self._logits_view(stop - start, kept)
        alive = self._bind_feeds(binding, feeds, logits)
        self.engine.session.run_with_iobinding(binding)
        del alive
        return logits

    def _run_concat(self, start: int, stop: int, feeds: dict, kept: int, past: int, width: int) -> np.ndarray:
        ort = self.engine._ort
        binding = self.engine.session.io_binding()
        presents, alive = [], []
        for layer, (past_names, present_names) in enumerate(zip(self.graph.past_names, self.graph.present_names)):
            for kind in (0, 1):
                view = self.cache.view(layer, kind, start, stop)
                past_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(view[:, :, :past]))
                present = np.empty(view.shape[:2] + (past + width, view.shape[3]), dtype=view.dtype)
                present_value = ort.OrtValue.ortvalue_from_numpy(present)
                binding.bind_ortvalue_input(past_names[kind], past_value)
                binding.bind_ortvalue_output(present_names[kind], present_value)
                presents.append((view, present))
                alive += [past_value, present_value]
        logits = self._logits_view(stop - start, kept)
        alive += self._bind_feeds(binding, feeds, logits)
        self.engine.session.run_with_iobinding(binding)
        for view, present in presents:  # the graph's past part is the past we gave it: keep only the new positions
            view[:, :, past:past + width] = present[:, :, past:]
        return logits

    def _bind_feeds(self, binding, feeds: dict, logits: np.ndarray) -> list:
        ort = self.engine._ort
        alive = []  # OrtValues must outlive the run
        for name, array in feeds.items():  # binding a name again replaces its value
            array = np.require(array, requirements="C")
            if array.ndim:  # the binding holds the array; half the Python work of an OrtValue per step
                binding.bind_cpu_input(name, array)
                continue
            value = ort.OrtValue.ortvalue_from_numpy(array)  # keeps 0-d arrays 0-d
            binding.bind_ortvalue_input(name, value)
            alive.append(value)
        value = ort.OrtValue.ortvalue_from_numpy(logits)
        binding.bind_ortvalue_output(LOGITS, value)
        alive.append(value)
        return alive
