"""The prefix cache: a prompt's KV computed once is reused by every later request that starts the same way.

Two levels, both keyed by the prompt's tokens:
  1. Free KV slots keep what their last request left. A new request goes to the free slot whose tokens share
     the longest prefix with its prompt, and only the rest is prefilled (a conversation's next turn, or the
     same system prompt, hits here at token granularity and copies nothing).
  2. A host-RAM LRU store of fixed-size token blocks, keyed by chained hashes as vLLM keys its blocks
     (a block's key hashes its parent's key with its own tokens, so a key names the whole prefix). When a
     free slot is about to be overwritten, its full blocks are saved here first; a request whose prompt's
     leading blocks are stored gets them copied into its slot.
At least one prompt token is always computed: its logits choose the first output token.
"""

from __future__ import annotations

import collections

import numpy as np

BLOCK_TOKENS = 16  # vLLM's default block size


def block_keys(tokens: list[int], block: int = BLOCK_TOKENS) -> list[int]:
    """Chained keys of the full blocks of ``tokens``: key_i = hash(key_{i-1}, block_i's tokens)."""
    keys, parent = [], None
    for start in range(0, len(tokens) - block + 1, block):
        parent = hash((parent, tuple(tokens[start:start + block])))
        keys.append(parent)
    return keys


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.flatnonzero(x != y)
    return int(differ[0]) if differ.size else n


class BlockStore:
    """KV of token blocks in host RAM, least recently used evicted past ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int, block: int = BLOCK_TOKENS):
        self.capacity, self.block = capacity_bytes, block
        self.blocks: collections.OrderedDict[int, list] = collections.OrderedDict()
        self.nbytes = 0

    def cached_blocks(self, tokens: list[int]) -> list[int]:
        """The keys of the leading blocks of ``tokens`` the store holds; marks them recently used."""
        found = []
        for key in block_keys(tokens, self.block):
            if key not in self.blocks:
                break
            self.blocks.move_to_end(key)
            found.append(key)
        return found

    def save(self, cache, slot: int) -> int:
        """Store the full blocks of what ``slot`` holds (a slot without left padding); returns blocks added."""
        tokens = cache.tokens[slot]
        if int(cache.lengths[slot]) != len(tokens):
            return 0  # left-padded positions do not line up with tokens: nothing to key them by
        added = 0
        for i, key in enumerate(block_keys(tokens, self.block)):
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            span = slice(i * self.block, (i + 1) * self.block)
            kv = [buffer[slot, :, span].copy() for layer in cache.buffers for buffer in layer]
            self.blocks[key] = kv
            self.nbytes += sum(a.nbytes for a in kv)
            added += 1
        self._evict()
        return added

    def load(self, cache, slot: int, tokens: list[int], keys: list[int]) -> int:
        """Fill ``slot`` with the KV of the blocks ``keys`` (as ``cached_blocks`` returned for ``tokens``);
        returns the tokens it now holds."""
        cache.clear(slot)
        for i, key in enumerate(keys):
            span = slice(i * self.block, (i + 1) * self.block)
            arrays = iter(self.blocks[key])
            for layer in cache.buffers:
                for buffer in layer:
                    buffer[slot, :, span] = next(arrays)
        count = len(keys) * self.block
        cache.record(slot, np.array([tokens[:count]], dtype=np.int64), np.ones((1, count), dtype=np.int64))
        return count

    def _evict(self) -> None:
        while self.nbytes > self.capacity and self.blocks:
            _, kv = self.blocks.popitem(last=False)
            self.nbytes -= sum(a.nbytes for a in kv)


class PrefixCache:
    """Where a new request's prompt starts from: the best free slot, then the block store."""

    def __init__(self, capacity_bytes: int, block: int = BLOCK_TOKENS):
        self.store = BlockStore(capacity_bytes, block) if capacity_bytes > 0 else None

    def place(self, cache, free_slots: list[int], prompt: list[int]) -> tuple[int, int]:
        """Choose a free slot for ``prompt`` and make it hold the longest cached prefix (at most all but the
        last prompt token); returns (slot, cached tokens)."""
        limit = len(prompt) - 1
        scored = [(min(common_prefix(cache.tokens[s], prompt), limit), s) for s in free_slots]
        reuse, slot = max(scored)
        if reuse == 0:  # no slot shares anything: take the one that holds least, keep the others' contents
            slot = min(free_slots, key=lambda s: int(cache.lengths[s]))
        if self.store is not None:
            if int(cache.lengths[slot]) > reuse:
                self.store.save(cache, slot)  # its contents are about to be overwritten: keep their blocks
            stored = self.store.cached_blocks(prompt[:limit])  # after save, whose evictions it must not miss
            if len(stored) * self.store.block > reuse:
                return slot, self.store.load(cache, slot, prompt, stored)
        cache.truncate(slot, reuse)
        return slot, reuse
