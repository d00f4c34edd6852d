"""The machine's streaming-read bandwidth, the denominator of the decode roofline.

How: allocate a float64 buffer much larger than the last-level cache (1 GiB by default), write it once so
every page is resident, then time ``numpy.sum`` over it, split into equal disjoint slices read by T
threads at once (numpy releases the GIL inside the reduction, so the threads really read in parallel,
the way ONNX Runtime's intra-op pool splits a MatMul's weight rows). Each configuration is timed
``passes`` times and the best pass counts. T is 1 and the number of usable cores (ORT's default
intra-op thread count); the roofline uses the larger result, the best streaming read this process saw.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..runtimes.cpu_features import usable_cores

METHOD = (
    "numpy float64 sum over a {mib} MiB buffer split into disjoint slices read by T threads at once "
    "(GIL released in the reduction), best of {passes} passes per T; max over T in {threads}"
)


class BandwidthProbe:
    """The measurement's buffer, kept so the bench can re-measure before every timed round.

    Host bandwidth on shared machines drifts by tens of percent within minutes (other tenants), so a
    roofline taken once before the runs can be wrong for all of them; re-measuring per round lets each
    run be compared with the bandwidth of its own moment.
    """

    def __init__(self, buffer_mib: int = 1024, threads: int | None = None):
        self.buffer_mib = buffer_mib
        self.counts = sorted({1, threads or usable_cores()})
        self.buffer = np.empty((buffer_mib << 20) // 8, dtype=np.float64)
        self.buffer.fill(1.0)  # first touch: the pages are resident before any timed pass

    def measure(self, passes: int = 5) -> dict:
        """Best-of-``passes`` GB/s per thread count, and their maximum."""
        by_threads = {}
        for count in self.counts:
            slices = np.array_split(self.buffer, count)
            best = 0.0
            with ThreadPoolExecutor(count) as pool:
                for _ in range(passes):
                    start = time.perf_counter()
                    list(pool.map(np.sum, slices))
                    best = max(best, self.buffer.nbytes / (time.perf_counter() - start) / 1e9)
            by_threads[count] = round(best, 2)
        return {"gb_per_s": max(by_threads.values()), "by_threads": {str(k): v for k, v in by_threads.items()}}

    def close(self) -> None:
        self.buffer = None


def streaming_read_bandwidth(
    buffer_mib: int = 1024, threads: int | None = None, passes: int = 5, probe: BandwidthProbe | None = None,
) -> dict:
    """Measure streaming-read bandwidth in GB/s (10^9 bytes per second), with how it was measured.

    ``probe`` reuses an open probe's buffer (left open, for later rounds); otherwise one is made and freed.

    >>> streaming_read_bandwidth(buffer_mib=64, passes=2)["gb_per_s"] > 0   # doctest: +SKIP
    True
    """
    own = probe is None
    probe = probe or BandwidthProbe(buffer_mib, threads)
    try:
        result = probe.measure(passes)
    finally:
        if own:
            probe.close()
    return {
        **result,
        "buffer_mib": probe.buffer_mib,
        "passes": passes,
        "method": METHOD.format(mib=probe.buffer_mib, passes=passes, threads=probe.counts),
    }
