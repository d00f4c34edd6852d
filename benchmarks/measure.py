"""The timing loop: warm-up, then repeated runs interleaved across systems.

Every system sits in its own loaded worker process, idle while another system runs. For each batch size,
round r runs every system once, starting the round at system r mod n (so no system is always first after
another one's run); the first ``warmup`` rounds are discarded. Interleaving spreads slow drifts of the
machine (thermal, other tenants) over all systems instead of biasing whichever ran last. All systems get
the same prompt: seeded random token ids, equal-length rows (no padding).
"""

from __future__ import annotations

from typing import Callable

from ..runtimes.timing import prompt_ids
from .worker import Worker, WorkerFailed


def interleaved_runs(
    workers: dict[str, Worker],
    batches: list[int],
    prompt_len: int,
    gen_len: int,
    warmup: int,
    repeats: int,
    vocab: int,
    seed: int,
    on_run: Callable[[str, int, int], None] = lambda name, batch, rnd: None,
    on_failure: Callable[[str, WorkerFailed], None] = lambda name, exc: None,
    probe: Callable[[], float] | None = None,
    settle: Callable[[], float] | None = None,
    max_batch: dict[str, int] | None = None,
) -> tuple[dict, dict]:
    """Time every worker; returns ({name: {batch: [{ttft_s, total_s}, ...]}}, {name: {batch: row-0 tokens}}).

    ``probe`` (streaming-read GB/s) runs before every timed round, while every worker idles; each run of
    that round carries its value as ``bandwidth_gb_s``. ``settle()`` runs before every run and the probe
    (waiting out the last system's spinning threads); its seconds are kept as ``settle_s``. A system whose
    run fails is reported through ``on_failure`` and left out of the remaining rounds. ``max_batch[name]``: the
    largest batch that system runs (llama-bench times one sequence); it sits out larger ones.
    """
    names = list(workers)
    timings = {name: {b: [] for b in batches} for name in names}
    tokens = {name: {} for name in names}
    failed: set[str] = set()
    for batch in batches:
        ids = prompt_ids(batch, prompt_len, vocab, seed).tolist()
        for rnd in range(warmup + repeats):
            shift = rnd % len(names)
            round_bandwidth = None
            if probe is not None and rnd >= warmup:
                if settle is not None:
                    settle()
                round_bandwidth = probe()
            for name in names[shift:] + names[:shift]:
                if name in failed or batch > (max_batch or {}).get(name, batch):
                    continue
                on_run(name, batch, rnd)
                settled = settle() if settle is not None else None
                try:
                    result = workers[name].request("run", ids=ids, new_tokens=gen_len)
                except WorkerFailed as exc:
                    failed.add(name)
                    on_failure(name, exc)
                    continue
                tokens[name][batch] = result["tokens"]
                if rnd >= warmup:
                    timing = {"ttft_s": result["ttft_s"], "total_s": result["total_s"]}
                    if "speculation" in result:
                        timing["speculation"] = result["speculation"]
                    if round_bandwidth is not None:
                        timing["bandwidth_gb_s"] = round_bandwidth
                    if settled is not None:
                        timing["settle_s"] = settled
                    timings[name][batch].append(timing)
    return timings, tokens
