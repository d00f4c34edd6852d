"""KV memory taken as requests need it: reserved slot buffers, a pool of blocks, admission and preemption by
memory, several prompts per prefill step, drafts verified across rows. Served tokens equal Engine.generate."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest

import luffy
from luffy.runtimes.kv_memory import ReservedMemory, resident_bytes
from luffy.serving.options import parse_bytes
from luffy.serving.requests import SamplingParams
from luffy.serving.scheduler import NoMetrics, Scheduler, SchedulerConfig

from .helpers import greedy_alone

PROMPTS = [list(b"def parse("), list(b"Return the"), list(b"class Foo:\n"), list(b"import os\n"), list(b"The module"),
           list(b"If the file exists, then"), list(b"Open the"), list(b"x = ")]


class _Watching(NoMetrics):
    """Records what the scheduler reports about memory and prefill steps."""

    def __init__(self):
        self.most_bytes = self.preemptions = self.swaps = self.steps = self.rows = 0

    def kv_cache(self, state):
        self.most_bytes = max(self.most_bytes, state["bytes"])
        assert state["bytes"] <= state["limit_bytes"] and state["blocks_used"] + state["blocks_cached"] <= \
            state["blocks_total"]

    def preempted(self, request, swapped):
        self.preemptions += 1
        self.swaps += swapped

    def prefill_step(self, rows, tokens, padded):
        self.steps, self.rows = self.steps + 1, self.rows + rows


def _serve(scheduler, prompts, max_tokens):
    results = [None] * len(prompts)

    def run(i):
        results[i] = scheduler.generate(prompts[i], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                   ignore_eos=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join(180) for t in threads]
    return [r.token_ids for r in results]


def test_memory_follows_the_positions_a_slot_holds(engine):
    slots = engine.open_slots(3, 256, allocate=ReservedMemory())
    cache = slots.cache
    buffers = [b for layer in cache.buffers for b in layer]
    assert cache.block_tokens == 32 and resident_bytes(buffers) == 0  # head_dim 32 x 4 B: 32 positions a page
    slots.step(0, 1, np.array([PROMPTS[5] * 2]))  # 48 positions: 2 blocks
    slots.step(1, 2, np.array([PROMPTS[0]]))      # 10 positions: 1 block
    assert resident_bytes(buffers) == 3 * cache.block_bytes
    cache.truncate(0, 20)
    assert resident_bytes(buffers) == 2 * cache.block_bytes
    cache.swap(0, 2)
    assert resident_bytes(buffers) == 2 * cache.block_bytes and cache.lengths.tolist() == [0, 10, 20]
    saved = cache.export(2)
    cache.clear(2)
    assert resident_bytes(buffers) == cache.block_bytes
    cache.restore(0, saved)
    alone = engine.open_slots(1, 256)
    alone.step(0, 1, np.array([(PROMPTS[5] * 2)[:20]]))
    # the restored slot continues exactly where the original would
    assert np.array_equal(slots.step(0, 1, np.array([[7]]))[0, -1], alone.step(0, 1, np.array([[7]]))[0, -1])


def test_a_burst_of_prompts_prefills_several_per_step(engine):
    metrics = _Watching()
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), metrics=metrics)

    def start_once_all_wait():  # a burst: every prompt queued before the first step (threads start at their pace)
        deadline = time.monotonic() + 60
        while scheduler.waiting < len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.01)
        scheduler.start()

    threading.Thread(target=start_once_all_wait).start()
    try:
        assert _serve(scheduler, PROMPTS, 12) == [greedy_alone(engine, p, 12) for p in PROMPTS]
        assert metrics.rows >= len(PROMPTS) and metrics.steps < metrics.rows  # some steps held several prompts
    finally:
        scheduler.stop()


@pytest.mark.parametrize("swap_space", [4.0, 0.0])  # preempted KV swapped to host memory, or recomputed
def test_a_small_kv_cache_queues_and_preempts_with_the_same_tokens(engine, swap_space):
    block = engine.open_slots(1, 64, allocate=ReservedMemory()).cache.block_bytes
    config = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=32, kv_cache_memory=str(6 * block),
                             swap_space=swap_space, prefix_cache=False)
    metrics = _Watching()
    scheduler = Scheduler(engine, config, metrics=metrics).start()
    try:
        assert scheduler.pool.total == 6 and scheduler.capacity == 6 * 32  # the context lowered to what fits
        assert _serve(scheduler, PROMPTS[:6], 60) == [greedy_alone(engine, p, 60) for p in PROMPTS[:6]]
        assert metrics.preemptions > 0 and metrics.swaps == (metrics.preemptions if swap_space else 0)
        assert 0 < metrics.most_bytes <= 6 * block
        assert scheduler.running == 0 and scheduler.pool.swapped_bytes == 0
        buffers = [b for layer in scheduler.slots.cache.buffers for b in layer]
        assert resident_bytes(buffers) <= 6 * block  # what the free slots keep, within the limit
    finally:
        scheduler.stop()


def test_requests_beyond_the_kv_cache_are_refused_naming_it(engine):
    block = engine.open_slots(1, 64, allocate=ReservedMemory()).cache.block_bytes
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=2, kv_cache_memory=str(4 * block)))
    with pytest.raises(luffy.CapacityError, match=r"exceeds the maximum context length 128 \(all the KV cache holds: "
                                                  r"4 blocks of 32 tokens"):
        scheduler.check(PROMPTS[0], SamplingParams(max_tokens=120))
    with pytest.raises(luffy.CapacityError, match="raise --kv-cache-memory or lower --max-model-len"):
        Scheduler(engine, SchedulerConfig(max_num_seqs=2, max_model_len=256, kv_cache_memory=str(4 * block)))
    with pytest.raises(luffy.UsageError, match="expected a size such as 1GiB"):
        SchedulerConfig(kv_cache_memory="lots")
    assert parse_bytes("1GiB") == 1 << 30 and parse_bytes("512M") == 512 << 20 and parse_bytes("1.5kb") == 1500


def test_drafts_of_several_rows_are_verified_in_one_step(engine, pydoc_int8):
    from luffy.serving.speculation import SpeculationConfig

    speculation = SpeculationConfig(draft=pydoc_int8.load(), num_tokens=3, max_batch=4)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=4, speculation=speculation)).start()
    steps = []
    step = scheduler.slots.step

    def counted(start, stop, ids, *args, **kwargs):  # what the engine is asked to run: rows and widths per step
        steps.append((stop - start, ids.shape[1]))
        return step(start, stop, ids, *args, **kwargs)

    scheduler.slots.step = counted
    try:
        assert _serve(scheduler, PROMPTS[:4], 24) == [greedy_alone(engine, p, 24) for p in PROMPTS[:4]]
        # a verify step: several rows of the last token and up to 3 proposals (prompts are >= 8 tokens)
        assert any(rows > 1 and 1 < width <= 4 for rows, width in steps)
    finally:
        scheduler.stop()


KV_GAUGES = ("luffy:kv_cache_bytes", "luffy:kv_cache_limit_bytes", "luffy:kv_cache_usage_perc",
             "luffy:kv_cache_swapped_bytes", "luffy:num_requests_swapped", "luffy:num_preemptions_total",
             "luffy:num_preemptions_swapped_total")


def _kv_scrape(server) -> dict[str, float]:
    """One GET /metrics: the KV gauges and the preemption counters, by name (the model_name label dropped)."""
    samples = {key.split("{")[0]: value for key, value in server.metrics().items()}
    return {name: samples[name] for name in KV_GAUGES}


def _complete(client, prompt: list[int]) -> str:
    got = client.completions.create(model="pydoc", prompt=prompt, max_tokens=60, temperature=0,
                                    extra_body={"ignore_eos": True})
    return got.choices[0].text


def test_a_served_small_kv_cache_reports_its_bytes_preemptions_and_swaps_over_http(engine, pydoc):
    # the scheduler test above, through `luffy serve`: six prompts of 60 tokens want 18 blocks of a 6-block pool
    pytest.importorskip("fastapi", reason="the serve extra (pip install 'luffy[serve]') is not installed")
    pytest.importorskip("openai", reason="the openai client is not installed")
    from .server_process import ServerProcess

    limit = 6 * engine.open_slots(1, 64, allocate=ReservedMemory()).cache.block_bytes
    prompts, scrapes, done = PROMPTS[:6], [], threading.Event()
    with ServerProcess(pydoc.path, "--max-num-seqs", "6", "--max-num-batched-tokens", "32", "--kv-cache-memory",
                       str(limit), "--swap-space", "1", "--no-prefix-cache", "--served-model-name", "pydoc") as server:
        client = server.client()

        def watch():  # scrape while the requests run: at least once, at most 3000 times, ~5 ms apart
            while len(scrapes) < 3000:
                scrapes.append(_kv_scrape(server))
                if done.wait(0.005):
                    break

        watcher = threading.Thread(target=watch)
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(_complete, client, p) for p in prompts]
            watcher.start()
            together = [f.result(timeout=120) for f in futures]
        done.set()
        watcher.join(30)
        after = _kv_scrape(server)
        alone = [_complete(client, p) for p in prompts]  # one at a time: nothing to preempt them
    assert together == alone
    assert scrapes and all(0 <= s["luffy:kv_cache_bytes"] <= s["luffy:kv_cache_limit_bytes"] == limit and
                           0 <= s["luffy:kv_cache_usage_perc"] <= 1 for s in scrapes + [after])
    # with swap space every preemption swaps (test above). A swapped request is in host memory only until a running
    # one finishes, which scrapes a loaded machine's server answers slowly may all miss: the counter says it
    assert after["luffy:num_preemptions_swapped_total"] == after["luffy:num_preemptions_total"] > 0
    counts = [(s["luffy:num_preemptions_swapped_total"], s["luffy:num_preemptions_total"]) for s in scrapes + [after]]
    assert all(swaps <= preemptions for swaps, preemptions in counts) and counts == sorted(counts)
    assert after["luffy:kv_cache_swapped_bytes"] == after["luffy:num_requests_swapped"] == 0
