"""How a generation is timed: one definition of prefill ms and decode tok/s, shared by `luffy bench`
(benchmarks/) and `luffy compile --auto` (luffy/auto.py), so both report the same numbers.

    >>> run = time_generation(lambda first_token: engine_generate(engine, ids, 32, first_token), 32)  # doctest: +SKIP
    >>> prefill_ms(run), decode_tokens_per_s(len(ids), 32, run)                                          # doctest: +SKIP
    (4.1, 2310.5)

Runtimes import nothing from compiler/ or benchmarks/; this module needs only numpy and the clock.
"""

from __future__ import annotations

import os
import time
from typing import Callable

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


def busy_ticks() -> int | None:
    """The machine's busy CPU ticks so far (/proc/stat), or None off Linux."""
    try:
        fields = open("/proc/stat").readline().split()[1:]
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
