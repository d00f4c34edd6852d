"""The machine's streaming-read bandwidth, the denominator of the decode roofline.

How: allocate a float64 buffer much larger than the last-level cache (1 GiB by default), write it once so
every page is resident, then time ``numpy.sum`` over it, split into equal disjoint slices read by T
threads at once (numpy releases the GIL inside the reduction, so the threads really read in parallel,
the way ONNX Runtime's intra-op pool splits a MatMul's weight rows). Each configuration is timed
``passes`` times and the best pass counts. T is 1 and the number of usable cores (ORT's default
intra-op thread count); the roofline uses the larger result, the best streaming read this process saw.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

METHOD = (
    "numpy float64 sum over a {mib} MiB buffer split into disjoint slices read by T threads at once "
    "(GIL released in the reduction), best of {passes} passes per T; max over T in {threads}"
)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def streaming_read_bandwidth(buffer_mib: int = 1024, threads: int | None = None, passes: int = 5) -> dict:
    """Measure streaming-read bandwidth in GB/s (10^9 bytes per second).

    >>> streaming_read_bandwidth(buffer_mib=64, passes=2)["gb_per_s"] > 0   # doctest: +SKIP
    True
    """
    threads = threads or usable_cores()
    counts = sorted({1, threads})
    nbytes = buffer_mib << 20
    buf = np.empty(nbytes // 8, dtype=np.float64)
    buf.fill(1.0)  # first touch: the pages are resident before any timed pass
    by_threads = {}
    try:
        for count in counts:
            slices = np.array_split(buf, count)
            best = 0.0
            with ThreadPoolExecutor(count) as pool:
                for _ in range(passes):
                    start = time.perf_counter()
                    list(pool.map(np.sum, slices))
                    best = max(best, buf.nbytes / (time.perf_counter() - start) / 1e9)
            by_threads[count] = round(best, 2)
    finally:
        del buf
    return {
        "gb_per_s": max(by_threads.values()),
        "by_threads": {str(k): v for k, v in by_threads.items()},
        "buffer_mib": buffer_mib,
        "passes": passes,
        "method": METHOD.format(mib=buffer_mib, passes=passes, threads=counts),
    }
