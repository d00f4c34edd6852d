"""Warm-up: run the step shapes of a burst once before /health says ready.

A fresh server used to pay for its first steps inside the first burst's requests: ONNX Runtime grows its
memory arena to the largest activations it has seen (a full prefill chunk, a decode step over every slot),
binds each run of slots once, and the process's thread pool and the logits buffer start cold. Measured
through `luffy bench serve` at 16 clients on the 156M reference model: TTFT p99 of the first burst 3.1-3.5x
its median, against 1.3x on a warm server (issue 22). An autoscaled replica's first users paid for it.

So, before the scheduler thread takes the engine, the largest prefill chunk runs in slot 0, then two decode
steps over every slot (the first from empty rows, the second with one position of past each); the
speculative draft, when there is one, gets a prefill and a decode step of its own. Then every slot is
cleared: no request, metric or prefix-cache block sees what the warm-up computed.
"""

from __future__ import annotations

import time

import numpy as np


def _warm_slots(slots, chunk: int, rng) -> int:
    """Prefill ``chunk`` tokens in slot 0, then decode twice over every slot (slot 0 alone for a concat-KV
    graph, whose rows step together only at equal lengths); clear them. Returns the steps run."""
    vocab = slots.graph.vocab
    n = slots.num_slots if slots.graph.shared_kv else 1
    width = max(1, min(chunk, slots.capacity - 2))
    decodes = min(2, slots.capacity - width)
    slots.step(0, 1, rng.integers(0, vocab, (1, width)))
    for _ in range(decodes):
        slots.step(0, n, rng.integers(0, vocab, (n, 1)))
    for slot in range(slots.num_slots):
        slots.cache.clear(slot)
    return 1 + decodes


def warm_up(scheduler, seed: int = 0) -> dict:
    """Warm ``scheduler``'s engine (and its draft) with the shapes it will run; call before ``scheduler.start()``.

    Returns what ran, for the server's log: ``{"steps": 6, "seconds": 0.41}``.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    steps = _warm_slots(scheduler.slots, scheduler.config.max_num_batched_tokens, rng)
    draft = getattr(scheduler.speculator.source, "slots", None) if scheduler.speculator is not None else None
    if draft is not None:
        steps += _warm_slots(draft, scheduler.config.max_num_batched_tokens, rng)
        scheduler.speculator.source.length = [0] * draft.num_slots
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 3)}
