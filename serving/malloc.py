"""Keep the C heap's freed memory in the server process instead of handing it back to the kernel at once.

Why: every decode step allocates and frees a few [batch, vocab] float32 arrays (2 MiB at 16 rows of a 32k
vocabulary: the sampling chain's copies, softmax and cumulative sums). glibc's malloc serves such sizes from
fresh mmap()s or trims the heap's top after the free, so the next step takes a page fault on every 4 KiB it
writes again. Measured on the 156M reference Llama, 16 requests at temperature 0.7 on the 2-core machine: a JSON
schema on every row made the step's softmax 5.6x slower than the free batch's (0.164 vs 0.029 s over 64
steps). Through `luffy serve` (quiet machine), the constrained batch ran at 0.863x the free one's tokens/s
(the figure in commit b300e39's message; that run's raw JSON was not kept); with freed memory kept, 0.966x (the
ratio of the medians of 5 alternated rounds, benchmarks/results/structured-throughput-ref156m.json). vLLM's CPU
backend asks its users to preload tcmalloc for the same reason; luffy sets
glibc's own thresholds instead, so nothing needs installing. Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 64 << 20  # below this, allocations come from the heap (reused), not a fresh mapping
TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top kept up to this much before it is returned


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for a long-running server process; True when glibc took them.

    >>> keep_freed_memory()   # once, at server start  # doctest: +SKIP
    True
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to set
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
