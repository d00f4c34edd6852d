"""`luffy bench`: time luffy's engine against its peers on the same weights, and the suite behind the README table.

    from luffy.benchmarks import bench, run_suite
    report = bench("build/my-llama", prompt_len=128, gen_len=128, batch=[1, 4], vs="torch,ort-export")
    print(report.to_markdown())

Submodules: api (the bench: builds, workers, the interleaved rounds of luffy.measure), peers (one runner per
system), worker (a process per system), bandwidth (streaming-read roofline), machine (what it ran on), report
(JSON + markdown), suite.
Names are imported lazily so ``python -m luffy.benchmarks.worker`` starts without the rest.
"""

from __future__ import annotations

__all__ = ["bench", "run_suite", "BenchReport", "PEERS"]


def __getattr__(name):
    if name == "bench":
        from .api import bench

        return bench
    if name == "run_suite":
        from .suite import run_suite

        return run_suite
    if name == "BenchReport":
        from .report import BenchReport

        return BenchReport
    if name == "PEERS":
        from .peers import PEERS

        return PEERS
    raise AttributeError(name)
