"""Which prompts prefill together, and how many tokens each (serving/prefill_plan.py).

A chunk of several tokens computes them as the whole prompt would; a one-token chunk goes through attention's
decode path, whose sums differ in the last bits. So no plan cuts a one-token chunk out of a longer prompt or
leaves one behind, and a chunked prompt gives the logits of the prompt prefilled whole, bit for bit.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from luffy.serving.prefill_plan import plan_chunks

PROMPT = list(b"def parse(path):\n    \"\"\"Read the file and return its lines.\"\"\"\n")


@settings(max_examples=400, deadline=None)
@given(remaining=st.lists(st.integers(1, 600), min_size=1, max_size=8), budget=st.integers(1, 2048))
def test_no_plan_takes_or_leaves_a_single_token_of_a_longer_prompt(remaining, budget):
    rows, width = plan_chunks(remaining, budget)
    assert rows * width <= budget
    for r in remaining[:rows]:
        chunk = min(r, width)
        assert chunk >= 2 or (rows == 1 and r == 1), (remaining, budget, rows, width)
        assert r - chunk != 1, (remaining, budget, rows, width)
    if budget >= 3:  # whatever the line, a budget of three or more always moves the first prompt
        assert rows >= 1
    single = plan_chunks(remaining, budget, single_tokens=True)
    assert single[0] >= 1 and single[0] * single[1] <= budget  # the fallback always moves something


def test_a_prompt_chunked_into_several_token_pieces_gives_the_logits_it_gives_whole(engine):
    prompt = PROMPT[:40]
    whole = engine.open_slots(1, 64).step(0, 1, np.array([prompt]))[0, -1].copy()
    for cut in (2, 20, 38):  # the chunks plan_chunks may make: none of one token
        slots = engine.open_slots(1, 64)
        slots.step(0, 1, np.array([prompt[:cut]]))
        assert np.array_equal(slots.step(0, 1, np.array([prompt[cut:]]))[0, -1], whole), cut
