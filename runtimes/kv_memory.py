"""KV slot buffers whose memory is taken as positions are written and given back as sequences shrink.

Why not blocks as vLLM pages them: ONNX Runtime's GroupQueryAttention reads each row's cache as one
contiguous run per KV head ([slots, kv_heads, capacity, head_dim], BNSH) and luffy binds a decode batch as
one view of rows [0, n) of one buffer; a block table would need an attention kernel of luffy's own. Nor
chunked growth (a larger buffer per sequence, copied into as it grows): it breaks that one-view binding and
copies every sequence at every growth. So the buffers keep their shape and the operating system pages
them: each is an anonymous mapping reserved without commit (MAP_NORESERVE), a page becomes memory when
the graph first writes a position in it, and ``release`` hands pages back (MADV_DONTNEED) when a sequence
is cut short or leaves its slot. Reading a page never written maps the shared zero page: no memory.

A block is the positions one page holds in one head's run, lcm(row, page) / row positions for a row of
head_dim x itemsize bytes (16 positions at head_dim 64 in fp32, 64 in int8), across every layer, kind and
head: with each run's start page-aligned (the capacity is rounded up to whole blocks), a slot holding L
positions holds exactly ceil(L / block) blocks of memory, which is what serving/kv_pool.py counts.
Transparent huge pages are refused for these mappings (MADV_NOHUGEPAGE): a 2 MiB page would commit 512
pages at once, and khugepaged would fill released holes.
"""

from __future__ import annotations

import math
import mmap

import numpy as np

from .smaps import read_mappings

PAGE = mmap.PAGESIZE
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python's mmap module omits it
_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", None)


def block_positions(row_bytes: list[int]) -> int:
    """Positions per block: the fewest positions that fill whole pages for every row size (head_dim x itemsize)."""
    block = 1
    for row in row_bytes:
        block = math.lcm(block, math.lcm(row, PAGE) // row)
    return block


class ReservedMemory:
    """An allocator for SlotKVCache: ``allocate(shape, dtype)`` reserves the buffer, ``release`` returns pages.

    >>> memory = ReservedMemory()
    >>> buffer = memory((4, 2, 64, 64), np.float32)       # 128 KiB reserved, nothing committed
    >>> buffer[1, :, :10] = 1.0                             # two pages committed (one per head)
    >>> memory.release(buffer, 0, buffer.nbytes)            # and given back (the buffer reads zeros)
    """

    releases = True

    def __init__(self):
        self._maps: dict[int, mmap.mmap] = {}  # buffer address -> its mapping (kept alive with it)

    def __call__(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        count = int(np.prod(shape))
        size = max(PAGE, -(-count * np.dtype(dtype).itemsize // PAGE) * PAGE)
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        if _MADV_NOHUGEPAGE is not None:
            mapping.madvise(_MADV_NOHUGEPAGE)
        array = np.frombuffer(mapping, dtype=dtype, count=count).reshape(shape)
        self._maps[array.ctypes.data] = mapping
        return array

    def release(self, buffer: np.ndarray, start: int, length: int) -> None:
        """Give back the whole pages of bytes [start, start + length) of ``buffer`` (they read as zeros after)."""
        mapping = self._maps[buffer.ctypes.data]
        first = -(-start // PAGE) * PAGE
        last = min((start + length) // PAGE * PAGE, len(mapping))
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def resident_bytes(buffers: list[np.ndarray]) -> int:
    """Bytes of ``buffers`` (each a ReservedMemory buffer, so one mapping each) backed by memory now, as the
    kernel counts them in /proc/self/smaps; 0 off Linux."""
    starts = {b.ctypes.data for b in buffers}
    return sum(m.fields.get("Rss", 0) for m in read_mappings() if m.start in starts)
