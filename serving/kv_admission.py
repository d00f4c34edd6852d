"""How the scheduler spends KV memory: the pool's blocks (serving/kv_pool.py) charged as requests grow, free
slots' cached contents taken back, requests preempted and resumed.

A part of Scheduler (serving/scheduler.py) kept in a file of its own: these methods read and change the
scheduler's slots, owners and waiting queue, under its rules: decoding requests hold slots [0, n), a free slot
keeps what it held for the prefix cache until the pool takes it back (least recently freed first), and a
preempted request waits first in line.
"""

from __future__ import annotations

from .requests import Request


class KVAdmission:
    """Scheduler's memory decisions; mixed into Scheduler, whose state they use."""

    def _charge(self, slot: int, positions: int) -> bool:
        """Charge ``slot`` for ``positions``, taking back free slots' cached contents (least recently freed first)
        while the pool is short; False when even that is not enough."""
        while not self.pool.charge(slot, positions):
            if not self._reclaim(keep=slot):
                return False
        return True

    def _cached_blocks(self) -> int:
        return sum(int(self.pool.charged[s]) for s in self._free_slots())

    def _reclaim(self, keep: int | None = None) -> bool:
        """Take back the blocks of the free slot freed longest ago (its full blocks saved to the prefix store
        first); False when no free slot but ``keep`` holds any."""
        held = [s for s in self._free_slots() if s != keep and self.pool.charged[s] > 0]
        if not held:
            return False
        slot = min(held, key=lambda s: self._freed_at[s])
        if self.prefix is not None and self.prefix.store is not None:
            self.prefix.store.save(self.slots.cache, slot)
        self.slots.cache.clear(slot)
        self.pool.settle(slot)
        return True

    def _make_room(self, width: int) -> None:
        """Charge every decoding row for ``width`` more positions; while the pool cannot (after taking back free
        slots' cached contents), preempt the request that started decoding last."""
        row = 0
        while row < self._decoding:
            if self._charge(row, min(int(self.slots.cache.lengths[row]) + width, self.capacity)):
                row += 1
            else:
                self._preempt(self._owner[self._decoding - 1])

    def _preempt(self, request: Request) -> None:
        """Take ``request``'s slot and memory: its KV goes to host memory (or, past the swap space, is dropped and
        recomputed), and it waits first in line to resume where it was."""
        slot = request.slot
        request.swapped = self.pool.swap_out(slot)
        if request.swapped is None:
            self.slots.cache.clear(slot)
            self.pool.settle(slot)
            request.prefilled = 0  # recompute: its prompt and output so far are prefilled again
        request.preemptions += 1
        self._vacate(request)
        with self._lock:
            self._waiting.appendleft(request)
        self.metrics.preempted(request, request.swapped is not None)

    def _resume_swapped(self) -> None:
        """Bring preempted requests whose KV is in host memory back into the decode batch, first in line first,
        while a slot is free and the pool holds their KV and the next token."""
        while True:
            with self._lock:
                if not self._waiting or self._waiting[0].swapped is None:
                    return
                request = self._waiting[0]
            free = self._free_slots()
            need = request.swapped.saved["length"] + 1
            if not free or self.pool.cache.blocks(need) > self.pool.free + self._cached_blocks():
                return
            with self._lock:
                self._waiting.popleft()
            slot = self._empty_slot(free)
            self._charge(slot, need)  # memory first (taking back cached contents), then the copy that fills it
            self.pool.swap_in(slot, request.swapped)
            self._charge(slot, need)  # swap_in charged what the copy holds; the next token's block again
            request.swapped = None
            self._take_slot(request, slot)
            self._start_decoding(request)

    def _forget_swapped(self, request: Request) -> None:
        if request.swapped is not None:
            self.pool.forget(request.swapped)
            request.swapped = None
