"""The slot KV cache and the continuous-batching scheduler, in-process (no HTTP): tokens equal Engine.generate alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import luffy
from luffy.serving.requests import SamplingParams
from luffy.serving.scheduler import NoMetrics, QueueFull, Scheduler, SchedulerConfig

from .helpers import greedy_alone

PROMPTS = [list(b"def parse("), list(b"Return the"), list(b"class Foo:\n"), list(b"import os\n"), list(b"The module"),
           list(b"x"), list(b"If the file exists, then"), list(b"Open the")]


def test_rows_of_different_lengths_decode_together_as_each_would_alone(engine):
    # the primitive under continuous batching: per-row lengths (seqlens_k), chunked prompts with a cache
    slots = engine.open_slots(4, 64)
    prompts = PROMPTS[:4]
    for s, p in enumerate(prompts):  # every prompt in two chunks, the second on top of the first's cache
        slots.step(s, s + 1, np.array([p[:3]]))
    tokens = [[int(np.argmax(slots.step(s, s + 1, np.array([p[3:]]))[0, -1]))] for s, p in enumerate(prompts)]
    for _ in range(11):
        step = slots.step(0, 4, np.array([[t[-1]] for t in tokens]))[:, -1]
        for row in range(4):
            tokens[row].append(int(np.argmax(step[row])))
    assert tokens == [greedy_alone(engine, p, 12) for p in prompts]
    assert list(slots.cache.lengths) == [len(p) + 11 for p in prompts]


def test_truncate_rolls_back_and_copy_prefix_shares(engine):
    slots = engine.open_slots(3, 64)
    prompt = PROMPTS[6]
    fresh = slots.step(0, 1, np.array([prompt]))[0, -1].copy()
    slots.step(0, 1, np.array([[5, 6, 7]]))  # tokens a draft proposed and the target rejected
    slots.cache.truncate(0, len(prompt) - 1)
    again = slots.step(0, 1, np.array([prompt[-1:]]))[0, -1]
    np.testing.assert_allclose(again, fresh, atol=1e-5)  # as if the rejected tokens never ran
    slots.cache.copy_prefix(0, 2, len(prompt) - 1)
    assert slots.cache.tokens[2] == prompt[:-1]
    shared = slots.step(2, 3, np.array([prompt[-1:]]))[0, -1]
    np.testing.assert_allclose(shared, fresh, atol=1e-5)


def test_chunked_prefill_and_staggered_arrivals_give_the_tokens_alone(engine):
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=5)).start()
    try:
        results = [None] * len(PROMPTS)

        def run(i):
            time.sleep(0.005 * i)
            results[i] = scheduler.generate(PROMPTS[i], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert [r.token_ids for r in results] == [greedy_alone(engine, p, 16) for p in PROMPTS]
        assert all(r.finish_reason == "length" and r.completion_tokens == 16 for r in results)
        assert scheduler.running == 0 and scheduler.waiting == 0 and scheduler.kv_cache_usage == 0
    finally:
        scheduler.stop()


def test_stop_tokens_min_tokens_and_cancel(engine):
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=2, max_queue=1)).start()
    try:
        greedy = greedy_alone(engine, PROMPTS[1], 12)
        stop = scheduler.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(greedy[4],)))
        assert stop.token_ids == greedy[:greedy.index(greedy[4]) + 1] and stop.finish_reason == "stop"
        held = scheduler.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, min_tokens=12,
                                                             stop_token_ids=(greedy[4],)))
        assert len(held.token_ids) == 12 and greedy[4] not in held.token_ids  # stop ids masked until min_tokens
        outputs, done = [], threading.Event()
        request = scheduler.submit(luffy.serving.requests.Request(
            PROMPTS[0], SamplingParams(max_tokens=900, temperature=0, ignore_eos=True),
            lambda o: (outputs.append(o), o.finish_reason and done.set())))
        while not outputs:
            time.sleep(0.005)
        scheduler.cancel(request)
        assert done.wait(30) and outputs[-1].finish_reason == "abort"
        deadline = time.monotonic() + 10
        while scheduler.running and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.running == 0 and len(outputs) < 900
    finally:
        scheduler.stop()


def test_a_full_queue_refuses_at_once(engine):
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=1, max_queue=1))  # not started: nothing leaves the queue
    scheduler.submit(luffy.serving.requests.Request(PROMPTS[0], SamplingParams(), lambda o: None))
    with pytest.raises(QueueFull, match="--max-queue 1"):
        scheduler.submit(luffy.serving.requests.Request(PROMPTS[0], SamplingParams(), lambda o: None))


def test_concat_kv_artifacts_are_served_one_row_per_step(tmp_path):
    # -O1 keeps the captured attention (present = concat(past, new)): rows cannot share a step at different lengths
    engine = luffy.compile("llama-pydoc", output=tmp_path / "o1", opt_level=1, check_parity=False).load()
    assert not engine.graph.shared_kv
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=4)).start()
    try:
        got = [None, None, None]

        def run(i):
            got[i] = scheduler.generate(PROMPTS[i], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert [g.token_ids for g in got] == [greedy_alone(engine, p, 8) for p in PROMPTS[:3]]
    finally:
        scheduler.stop()


@pytest.mark.parametrize("how", ["draft", "prompt-lookup"])
def test_speculation_in_the_scheduler_gives_the_tokens_alone(engine, pydoc_int8, how):
    from luffy.serving.speculation import SpeculationConfig

    if how == "draft":
        draft = pydoc_int8.load()
        speculation = SpeculationConfig(draft=draft, num_tokens=4, max_batch=2)
    else:
        speculation = SpeculationConfig(prompt_lookup=4, max_batch=2)
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=8, speculation=speculation),
                          metrics=_Counting()).start()
    try:
        results = [None] * 5

        def run(i):
            time.sleep(0.01 * i)  # 1 to 3 decoding at a time: rounds speculate at <= 2, batch at 3
            results[i] = scheduler.generate(PROMPTS[i], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert [r.token_ids for r in results] == [greedy_alone(engine, p, 20) for p in PROMPTS[:5]]
        assert scheduler.metrics.proposed > 0 and 0 < scheduler.metrics.accepted <= scheduler.metrics.proposed
        assert scheduler.running == 0
    finally:
        scheduler.stop()


class _Counting(NoMetrics):
    """The scheduler's metrics interface, counting what speculation and the prefix cache report."""

    proposed = accepted = queried = hit = 0

    def prefix_lookup(self, queried, hit):
        self.queried, self.hit = self.queried + queried, self.hit + hit

    def speculated(self, proposed, accepted):
        self.proposed, self.accepted = self.proposed + proposed, self.accepted + accepted


def test_prefix_cache_reuses_free_slots_and_stored_blocks(engine):
    system = list(b"You answer questions about the Python standard library. " * 3)
    prompts = [system + list(b"What is os.path?"), system + list(b"What is json?"), list(b"Unrelated prompt."),
               list(b"Another unrelated one."), system + list(b"What is re?")]
    expected = [greedy_alone(engine, p, 12) for p in prompts]
    metrics = _Counting()
    # one slot: every request overwrites the last one's contents, so the third and fourth push the system
    # prompt's blocks into the host-RAM store, and the fifth is served from there
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=1, prefix_cache_mb=4), metrics=metrics).start()
    try:
        got = [scheduler.generate(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in prompts]
        assert [g.token_ids for g in got] == expected
        assert metrics.hit >= 2 * (len(system) // 16) * 16  # the second (slot) and the fifth (blocks) request
        assert scheduler.prefix.store.blocks
    finally:
        scheduler.stop()


def test_a_request_that_fails_inside_a_step_ends_alone(engine):
    """A request whose output cannot be delivered (its client's event loop is gone: emit raises) fails inside
    the scheduler's decode and prefill steps; the requests beside it keep the tokens they get alone, its slot
    is freed and cleared, and the scheduler goes on serving."""
    from luffy.serving.requests import Output, Request

    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=6)).start()
    try:
        failed = []

        def broken(after: int):
            seen = []

            def emit(output: Output):
                seen.append(output)
                if output.finish_reason is not None:
                    failed.append(output)
                elif len(seen) > after:
                    raise RuntimeError("Event loop is closed")

            return emit

        good = {}

        def run(i):
            good[i] = scheduler.generate(PROMPTS[i], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        for after in (0, 3):  # fails at its first token (prefill) and at its fourth (batched decode)
            scheduler.submit(Request(PROMPTS[5 + after // 3], SamplingParams(max_tokens=20, temperature=0,
                                                                            ignore_eos=True), broken(after)))
        [t.join(120) for t in threads]
        assert [good[i].token_ids for i in range(3)] == [greedy_alone(engine, PROMPTS[i], 20) for i in range(3)]
        assert [o.finish_reason for o in failed] == ["error", "error"]
        assert all("RuntimeError: Event loop is closed" in o.error for o in failed)
        assert scheduler.running == 0 and scheduler.kv_cache_usage == 0
        after = scheduler.generate(PROMPTS[7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        assert after.token_ids == greedy_alone(engine, PROMPTS[7], 8)  # the engine goes on
    finally:
        scheduler.stop()


def test_the_logits_chain_in_the_scheduler_gives_the_tokens_alone(engine):
    # penalties, logit_bias and min_p through the one chain: a request batched with others equals Engine.generate
    chained = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3, logit_bias={ord("e"): -3.0},
                   min_p=0.05)
    cases = [(PROMPTS[0], dict(temperature=0)), (PROMPTS[1], dict(temperature=0.8, seed=3)),
             (PROMPTS[2], dict(temperature=1e-40))]  # 1e-40 is greedy (it used to give NUL bytes)
    expected = []
    for prompt, how in cases:
        sampled = dict(do_sample=True, temperature=how["temperature"], seed=how["seed"]) if "seed" in how else {}
        expected.append(engine.generate([prompt], max_new_tokens=16, eos_token_id=None, **chained, **sampled)[0, len(prompt):])
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=3)).start()
    try:
        results = [None] * len(cases)

        def run(i):
            prompt, how = cases[i]
            results[i] = scheduler.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True, **chained, **how))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert [r.token_ids for r in results] == [e.tolist() for e in expected]
        assert results[0].token_ids != greedy_alone(engine, PROMPTS[0], 16)  # the chain did change something
    finally:
        scheduler.stop()


def test_speculation_with_penalties_keeps_the_tokens_alone(engine, pydoc_int8):
    # the draft proposes through the same chain, each position judged with the penalties of the tokens before
    # it (accepted ones included): rounds of several kept tokens give plain decoding's tokens
    from luffy.serving.speculation import SpeculationConfig

    prompt = PROMPTS[0]
    chained = dict(repetition_penalty=1.2, frequency_penalty=0.5)
    expected = engine.generate([prompt], max_new_tokens=32, eos_token_id=None, **chained)[0, len(prompt):].tolist()
    config = SchedulerConfig(max_num_seqs=1, speculation=SpeculationConfig(draft=pydoc_int8.load(), num_tokens=4))
    scheduler = Scheduler(engine, config, metrics=_Counting()).start()
    try:
        got = scheduler.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, **chained))
        assert got.token_ids == expected and scheduler.metrics.accepted > 8
        assert expected != greedy_alone(engine, prompt, 32)
    finally:
        scheduler.stop()


def test_siblings_share_one_prefill_and_wait_for_slots_when_none_is_free(engine):
    # n = 3 choices with 2 slots: the second copies the first's prompt KV, the third waits and is prefilled
    # when a slot frees; each equals Engine.generate with its own seed either way
    prompt = PROMPTS[6]
    done, outputs = threading.Event(), {}

    def emit(output):
        outputs.setdefault(output.request_id, []).append(output)
        if sum(o[-1].finish_reason is not None for o in outputs.values()) == 3:
            done.set()

    group = [luffy.serving.requests.Request(list(prompt), SamplingParams(max_tokens=10, temperature=0.9, seed=7 + i,
                                                                          ignore_eos=True), emit, request_id=f"c{i}")
             for i in range(3)]
    group[0].siblings = group[1:]
    metrics = _Counting()
    scheduler = Scheduler(engine, SchedulerConfig(max_num_seqs=2, prefix_cache=False), metrics=metrics).start()
    try:
        scheduler.submit_all(group)
        assert done.wait(60)
        for i in range(3):
            expected = engine.generate([prompt], max_new_tokens=10, eos_token_id=None, do_sample=True, temperature=0.9,
                                      seed=7 + i)[0, len(prompt):].tolist()
            assert luffy.serving.requests.Output.merge(outputs[f"c{i}"]).token_ids == expected
        assert metrics.hit == len(prompt)  # the second choice's copy; the third was prefilled
        scored = scheduler.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=2))
        assert scored.finish_reason == "length" and scored.token_ids == [] and len(scored.prompt_logprobs) == len(prompt)
    finally:
        scheduler.stop()
