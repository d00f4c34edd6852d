"""Several rows of several tokens with a cache in one step (GroupQueryAttention's query_seqlens)."""

import numpy as np
import pytest

import luffy
from luffy.tests.helpers import PROMPT


def _padded(chunks):
    ids = np.zeros((len(chunks), max(len(c) for c in chunks)), dtype=np.int64)
    for row, chunk in enumerate(chunks):
        ids[row, :len(chunk)] = chunk
    return ids, [len(c) for c in chunks]


def test_rows_of_several_tokens_with_a_cache_equal_each_row_alone(zoo_artifacts):
    engine = zoo_artifacts("llama-tiny")[0].load()
    assert engine.graph.multi_row
    prompts = [[256, *PROMPT], PROMPT[:5], [256, *PROMPT[:12]], PROMPT * 2]
    alone = []
    for prompt in prompts:  # each row alone: its prompt in one step, the logits of its last 3 tokens
        slots = engine.open_slots(1, 64)
        alone.append(slots.step(0, 1, np.array([prompt]), keep=3)[0].copy())
    slots = engine.open_slots(4, 64)
    ids, counts = _padded([p[:6] for p in prompts])
    slots.step(0, 4, ids, counts=counts)
    rest = [p[6:] for p in prompts]  # row 1 is idle now (0 tokens): its cache stays as it is
    ids, counts = _padded(rest)
    logits = slots.step(0, 4, ids, keep=3, counts=counts)
    assert logits.shape == (4, 3, 320)
    for row, count in enumerate(counts):
        if count:  # a row's own last min(count, 3) tokens, right-aligned
            n = min(count, 3)
            assert np.abs(logits[row, 3 - n:] - alone[row][3 - n:]).max() <= 1e-5
    assert slots.cache.lengths.tolist() == [len(p) for p in prompts]
    assert slots.cache.tokens == [list(p) for p in prompts]
    assert (slots.cache.mask[1, 5:] == 0).all()  # right padding is neither written nor booked
    # rows of different lengths, one as wide as the step, every position kept (a speculative verify step)
    more = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14]]
    ids, counts = _padded(more)
    logits = slots.step(0, 4, ids, keep=4, counts=counts)
    for row, (prompt, extra) in enumerate(zip(prompts, more)):
        alone = engine.open_slots(1, 64)
        alone.step(0, 1, np.array([prompt]))
        expected = alone.step(0, 1, np.array([extra]), keep=len(extra))[0]
        assert np.abs(logits[row, 4 - len(extra):] - expected).max() <= 1e-5


def test_bad_rows_are_refused(zoo_artifacts):
    slots = zoo_artifacts("llama-tiny")[0].load().open_slots(2, 16)
    with pytest.raises(luffy.UsageError, match="idle row"):
        slots.step(0, 2, np.array([[3, 4], [0, 0]]), counts=[2, 0])  # slot 1 holds nothing to keep
    with pytest.raises(luffy.UsageError, match="must lie in"):
        slots.step(0, 2, np.array([[3, 4], [5, 6]]), counts=[3, 1])
    slots.step(0, 2, np.array([[3] * 10, [4] * 10]), counts=[10, 2])
    with pytest.raises(luffy.CapacityError, match="capacity 16"):  # row 0 holds 10: a width of 7 does not fit
        slots.step(0, 2, np.array([[5] * 7, [6] * 7]), counts=[1, 7])
