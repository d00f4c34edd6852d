"""How luffy measures speed: one definition of prefill ms and decode tok/s, the timed generation, the
interleaved rounds, the pause for a quiet CPU and the statistics, used by `luffy bench` (benchmarks/),
`luffy compile --auto` (luffy/auto.py) and the benchmark scripts, so all of them report the same numbers.

    >>> run = time_generation(lambda first_token: engine_generate(engine, ids, 32, first_token), 32)  # doctest: +SKIP
    >>> prefill_ms(run), decode_tokens_per_s(len(ids), 32, run)                                          # doctest: +SKIP
    (4.1, 2310.5)

It sits at the package root beside errors.py, so the runtimes, the compiler side and the benchmarks may all
import it: it needs only numpy, the clock and /proc.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable, Sequence

import numpy as np


def prompt_ids(batch: int, prompt_len: int, vocab: int, seed: int) -> np.ndarray:
    """Seeded random token ids, equal-length rows (no padding): every timed system gets the same prompt."""
    rng = np.random.default_rng([seed, batch, prompt_len])
    return rng.integers(0, vocab, size=(batch, prompt_len), dtype=np.int64)


def time_generation(generate: Callable[[Callable[[], None]], list], new_tokens: int, label: str = "generate") -> dict:
    """Run ``generate(first_token)`` once; it must call ``first_token()`` the moment the first new token
    exists and return the new tokens of row 0. Returns ``{ttft_s, total_s, tokens}``."""
    marks = []
    start = time.perf_counter()
    tokens = generate(lambda: marks.append(time.perf_counter()))
    total = time.perf_counter() - start
    if len(marks) != 1 or len(tokens) != new_tokens:
        raise RuntimeError(f"{label}: produced {len(tokens)} tokens, first-token marks {len(marks)}")
    return {"ttft_s": marks[0] - start, "total_s": total, "tokens": tokens}


def engine_generate(engine, ids: np.ndarray, new_tokens: int, first_token: Callable[[], None], **kwargs) -> list[int]:
    """A luffy Engine's greedy generation for ``time_generation``: no early stop at end of sequence, and the
    streamer's first call (prefill done, first token chosen) marks the first token."""
    state = {"first": True}

    def streamer(_tokens):
        if state["first"]:
            state["first"] = False
            first_token()

    out = engine.generate(ids, max_new_tokens=new_tokens, eos_token_id=None, streamer=streamer, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def prefill_ms(run: dict) -> float:
    """Time to first token in milliseconds: prompt forward pass + first pick."""
    return run["ttft_s"] * 1e3


def decode_tokens_per_s(batch: int, new_tokens: int, run: dict) -> float:
    """batch x (new tokens - 1) / (generation time - time to first token)."""
    return batch * (new_tokens - 1) / (run["total_s"] - run["ttft_s"])


def time_per_output_token(stamps: Sequence[float]) -> float:
    """Seconds per token after the first, from the moments tokens arrived (a streamer's calls, or a stream's
    chunks as its client reads them): where only arrivals can be seen, as through a server."""
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def round_order(names: Sequence[str], rnd: int) -> list[str]:
    """The order of round ``rnd``: every name once, starting ``rnd`` places further along, so no system is always
    the one timed right after another's run and a slow drift of the machine spreads over all of them."""
    shift = rnd % len(names)
    return [*names[shift:], *names[:shift]]


def interleaved_rounds(names: Sequence[str], warmup: int, repeats: int, run_one: Callable[[str, int], Any],
                       before_round: Callable[[int], None] = lambda rnd: None) -> dict[str, list]:
    """``warmup + repeats`` rounds, each running ``run_one(name, round)`` for every name in ``round_order``;
    returns the samples of the timed rounds per name (warm-up samples and None, a system left out, dropped).
    ``before_round(round)`` runs first in each round (a bandwidth probe, a progress line, a decision that
    needs the warm-up's samples).

    >>> interleaved_rounds(["a", "b"], 1, 2, lambda name, rnd: (name, rnd))
    {'a': [('a', 1), ('a', 2)], 'b': [('b', 1), ('b', 2)]}
    """
    samples = {name: [] for name in names}
    for rnd in range(warmup + repeats):
        before_round(rnd)
        for name in round_order(names, rnd):
            sample = run_one(name, rnd)
            if rnd >= warmup and sample is not None:
                samples[name].append(sample)
    return samples


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and quartiles of timed runs (the bench's cells: median [min-max]).

    >>> spread([3.0, 1.0, 2.0])["median"]
    2.0
    """
    arr = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(arr, [25, 50, 75])
    return {"median": float(median), "min": float(arr.min()), "max": float(arr.max()), "q1": float(q1), "q3": float(q3),
            "n": int(arr.size)}


def latency_summary(values: Sequence[float]) -> dict:
    """Mean, median and p99 of request latencies, as `vllm bench serve` reports them (None without values)."""
    if not values:
        return {"mean": None, "median": None, "p99": None}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "p99": float(np.percentile(arr, 99))}


def busy_ticks() -> int | None:
    """The machine's busy CPU ticks so far (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def wait_for_quiet_cpu(limit_s: float = 3.0, window_s: float = 0.05, busy_share: float = 0.1) -> float:
    """Sleep until one ``window_s`` window has the machine's CPUs at most ``busy_share`` busy (/proc/stat),
    or ``limit_s`` passed; returns the seconds waited.

    Why: runtimes keep their threads spinning after a run (ONNX Runtime's intra-op pool, OpenMP's
    GOMP_SPINCOUNT under torch), for milliseconds to a good part of a second. Without a pause, the system
    timed next shares the cores with the last one's spinning threads, and its prefill pays for it.
    """
    start = time.perf_counter()
    ticks_per_window = os.sysconf("SC_CLK_TCK") * window_s * (os.cpu_count() or 1)
    before = busy_ticks()
    if before is None:  # not Linux: a fixed pause instead
        time.sleep(min(limit_s, 0.5))
        return round(time.perf_counter() - start, 3)
    while time.perf_counter() - start < limit_s:
        time.sleep(window_s)
        now = busy_ticks()
        if now - before <= busy_share * ticks_per_window:
            break
        before = now
    return round(time.perf_counter() - start, 3)


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped worker, builder and their children
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuAccount:
    """How much CPU other processes used while a measurement ran: machine busy time (/proc/stat) minus the
    CPU time of this process and its reaped children. Call ``stop`` after every worker has exited."""

    def __init__(self):
        self.ticks, self.own, self.wall = busy_ticks(), _own_cpu_seconds(), time.perf_counter()
        self.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def stop(self) -> dict:
        wall = time.perf_counter() - self.wall
        ticks = busy_ticks()
        out = {"wall_s": round(wall, 1), "load_average_before": self.load_before, "other_cpu_share": None}
        if ticks is not None and self.ticks is not None and wall > 0:
            busy = (ticks - self.ticks) / os.sysconf("SC_CLK_TCK")
            other = max(0.0, busy - (_own_cpu_seconds() - self.own))
            out["other_cpu_s"] = round(other, 1)
            out["other_cpu_share"] = round(other / (wall * (os.cpu_count() or 1)), 3)  # of the whole machine
        return out
