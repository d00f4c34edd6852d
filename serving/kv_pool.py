"""The KV cache's memory as a pool of blocks: what admission and preemption decide by.

The slot buffers are reserved address space whose pages are memory only where positions are written
(runtimes/kv_memory.py), so a slot holding L positions holds ceil(L / block) blocks. The pool holds
``total`` blocks, from ``--kv-cache-memory`` or, by default, every slot full but at most half the memory
the machine has available at start (the rest is for weights, activations, the prefix store, swapped KV and
whatever else runs there). It counts the blocks each slot is charged:
  - a request is admitted only when the blocks for its whole prompt can be charged, so a prefill never
    waits for memory halfway;
  - a decoding row is charged a block when it grows into one;
  - a slot that finished keeps its contents for the prefix cache; those blocks are ``cached``: taken back
    (saved to the prefix cache's host store first) before any request waits for memory;
  - when nothing more can be taken back the scheduler preempts the request admitted last: its KV is copied
    to host memory (up to ``swap_bytes``, vLLM's swap space) and back when it resumes, so its output is
    unchanged; past that, it recomputes its tokens when it resumes.
One sequence of the whole context must fit: when the pool holds fewer tokens than --max-model-len, the
server refuses to start; when that length was not given, the context is lowered to what the pool holds, and a
request longer than that is refused at the edge with the limit named.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CapacityError

DEFAULT_SHARE = 0.5  # of the machine's available memory, when --kv-cache-memory is not given
def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None off Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@dataclass
class SwappedKV:
    """A preempted request's KV in host memory (SlotKVCache.export's copy)."""

    saved: dict
    nbytes: int


class KVPool:
    """Blocks of one SlotKVCache: ``total`` of them fit the limit, ``charged[slot]`` are counted for a slot.

    >>> pool = KVPool(cache, limit_bytes=1 << 30)            # doctest: +SKIP
    >>> pool.charge(slot, 512)                               # doctest: +SKIP
    True
    """

    def __init__(self, cache, limit_bytes: int | None = None, swap_bytes: int = 4 << 30):
        self.cache = cache
        full = cache.num_slots * cache.blocks(cache.capacity)
        if limit_bytes is None:
            available = available_memory()
            limit_bytes = full * cache.block_bytes if available is None else \
                min(full * cache.block_bytes, int(available * DEFAULT_SHARE))
            self.limit_source = "all slots full" if limit_bytes == full * cache.block_bytes else \
                f"half of the {format_bytes(available)} available"
        else:
            self.limit_source = "--kv-cache-memory"
        self.limit_bytes = limit_bytes
        self.total = min(full, limit_bytes // cache.block_bytes)
        if self.total < 1:
            raise CapacityError(f"--kv-cache-memory {format_bytes(limit_bytes)} holds no KV block of "
                                f"{cache.block_tokens} tokens ({format_bytes(cache.block_bytes)})")
        self.charged = np.zeros(cache.num_slots, dtype=np.int64)
        self.swap_limit, self.swapped_bytes = swap_bytes, 0

    @property
    def used(self) -> int:
        return int(self.charged.sum())

    @property
    def free(self) -> int:
        return self.total - self.used

    @property
    def tokens(self) -> int:
        """Positions the pool holds, all slots together."""
        return self.total * self.cache.block_tokens

    def describe(self) -> str:
        cache = self.cache
        return (f"{self.total} blocks of {cache.block_tokens} tokens x {format_bytes(cache.block_bytes)} = "
                f"{format_bytes(self.total * cache.block_bytes)} ({self.limit_source}), {self.tokens:,} tokens in "
                f"{cache.num_slots} slots of up to {cache.capacity}")

    def charge(self, slot: int, positions: int) -> bool:
        """Charge ``slot`` for ``positions`` positions if the pool has the blocks; False (nothing charged) if not."""
        need = self.cache.blocks(positions) - int(self.charged[slot])
        if need > self.free:
            return False
        if need > 0:
            self.charged[slot] += need
        return True

    def settle(self, slot: int) -> None:
        """Charge ``slot`` for what it holds now (after it was cut short, cleared or filled from elsewhere)."""
        self.charged[slot] = self.cache.blocks(int(self.cache.lengths[slot]))

    def settle_all(self) -> None:
        for slot in range(self.cache.num_slots):
            self.settle(slot)

    def swap_out(self, slot: int) -> SwappedKV | None:
        """Copy ``slot``'s KV to host memory and clear the slot; None (slot untouched) past the swap space."""
        nbytes = int(self.cache.lengths[slot]) * self.cache.bytes_per_token
        if self.swapped_bytes + nbytes > self.swap_limit:
            return None
        swapped = SwappedKV(self.cache.export(slot), nbytes)
        self.swapped_bytes += nbytes
        self.cache.clear(slot)
        self.settle(slot)
        return swapped

    def swap_in(self, slot: int, swapped: SwappedKV) -> None:
        self.cache.restore(slot, swapped.saved)
        self.swapped_bytes -= swapped.nbytes
        self.settle(slot)

    def forget(self, swapped: SwappedKV) -> None:
        """A swapped request ended before it resumed: its host copy is gone."""
        self.swapped_bytes -= swapped.nbytes
