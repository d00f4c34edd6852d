"""Back the weight buffers ONNX Runtime allocates with 2 MiB transparent huge pages (Linux, best effort).

Why luffy does this itself: decoding at batch 1 reads every weight once per token, so its speed is the
speed of one long streaming read. ONNX Runtime copies each constant MatMul weight into a prepacked
buffer it allocates with malloc; on a kernel whose transparent-huge-page mode is ``madvise`` (the common
default) those buffers get 4 KiB pages, and a stream over 4 KiB pages takes a TLB miss every 4 KiB,
where the hardware prefetchers also stop. numpy asks for huge pages on its own large arrays; ONNX
Runtime has no session option for it. So the engine notes the process's anonymous mappings before it
builds the session, and afterwards asks the kernel to back the new, fully resident ones (the weights;
not thread stacks, which are mostly untouched) with huge pages: ``MADV_HUGEPAGE`` for pages faulted
later, ``MADV_COLLAPSE`` (Linux >= 6.1) to rebuild the present pages now, contents preserved. A kernel
that refuses (older, THP ``never``, another OS) leaves memory exactly as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

from .smaps import read_mappings

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
MIN_REGION = 4 << 20  # smaller mappings hold activations and bookkeeping, not weights
MIN_RESIDENT = 0.9  # weights are written in full while being packed; stacks and arenas are not
NOTHING_COLLAPSED = {"bytes": 0, "regions": 0, "refused": 0, "seconds": 0.0}


def anonymous_mappings() -> dict[tuple[int, int], int]:
    """Private anonymous mappings of this process (the brk heap included): (start, end) -> resident bytes.

    Empty off Linux. A mapping that grew has a new key; huge_page_candidates counts only its new addresses.
    """
    return {(m.start, m.end): m.fields.get("Rss", 0) for m in read_mappings() if m.private_anonymous}


def huge_page_candidates(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    """The 2 MiB-aligned ranges worth collapsing: address ranges mapped in ``after`` and in no mapping of
    ``before``, at least MIN_REGION long, in a mapping at least MIN_RESIDENT resident.

    Only the new addresses count: the kernel merges adjacent anonymous mappings and malloc grows the brk
    heap in place, so a buffer can arrive as the grown tail of an old mapping, and collapsing the old part
    again on every load (a long-lived process's heap can be hundreds of MB) would cost seconds per load.
    """
    old = sorted(before)
    ranges = []
    for (start, end), resident in sorted(after.items()):
        if resident < MIN_RESIDENT * (end - start):
            continue
        pieces = [(start, end)]
        for old_start, old_end in old:  # subtract every old range
            pieces = [part for lo, hi in pieces
                      for part in ((lo, min(hi, old_start)), (max(lo, old_end), hi)) if part[0] < part[1]]
        for lo, hi in pieces:
            first, last = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
            if hi - lo >= MIN_REGION and last > first:
                ranges.append((first, last))
    return ranges


def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def back_new_mappings_with_huge_pages(before: dict[tuple[int, int], int]) -> dict:
    """Collapse the anonymous mappings that appeared since ``before`` and are nearly all resident.

    Returns what happened, for the engine's ``huge_pages`` report: bytes collapsed into huge pages,
    regions tried, regions the kernel refused, seconds spent.

    >>> before = anonymous_mappings()
    >>> session = onnxruntime.InferenceSession("model.onnx")          # doctest: +SKIP
    >>> back_new_mappings_with_huge_pages(before)["bytes"] > 0        # doctest: +SKIP
    True
    """
    start_time = time.perf_counter()
    report = dict(NOTHING_COLLAPSED)
    candidates = huge_page_candidates(before, anonymous_mappings())
    if not candidates:
        return report
    try:
        madvise = _madvise()
    except (OSError, AttributeError):
        return report
    for first, last in candidates:
        report["regions"] += 1
        madvise(first, last - first, MADV_HUGEPAGE)  # an error here just means no THP: nothing changes
        if madvise(first, last - first, MADV_COLLAPSE) == 0:
            report["bytes"] += last - first
        else:
            report["refused"] += 1
    report["seconds"] = round(time.perf_counter() - start_time, 3)
    return report
