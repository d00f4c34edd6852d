"""Which prompts prefill together in one multi-row step, and how many tokens each.

A multi-row step (GroupQueryAttention's query_seqlens, runtimes/ort_slots.py) right-pads every row to the
step's width S, and every padded position costs what a real one does in the matmuls. So the plan charges
the budget for rows x S, not for the tokens that are real: among the first m prompts in line (m = 1, 2,
...), it takes the m and S that put the most real tokens through within the budget, each row's chunk
being min(its remaining prompt, S). One long prompt gets the whole budget alone; a burst of short ones
goes in together; a short one beside a long one waits rather than pad the long one's row.

No chunk is a single token of a longer prompt, and no row shares a step with others on a one-token chunk:
GroupQueryAttention computes a one-token row on its decode path, whose sums differ in the last bits from the
prompt path that computes the same token when the prompt is prefilled alone, so where the budget happened to
cut would change the request's output (on a random-weight 1B, a near tie is that close). A plan that needs one
is deferred while decoding goes on; ``single_tokens=True`` allows it where nothing else would make progress.
"""

from __future__ import annotations


def plan_chunks(remaining: list[int], budget: int, room: list[int] | None = None,
                single_tokens: bool = False) -> tuple[int, int]:
    """(rows, width): prefill the first ``rows`` prompts in line, each min(its remaining tokens, ``width``).

    ``remaining``: each prompt's tokens still to prefill, in line order; ``budget``: padded tokens the step may
    cost (rows x width); ``room``: the most positions each row's slot can take in this step (its capacity
    less what it holds: a padded row needs room for the whole width). (0, 0) when nothing fits.

    >>> plan_chunks([100, 100, 100, 100], 256)       # four rows of 64
    (4, 64)
    >>> plan_chunks([500, 8, 8], 256)                 # the long prompt alone: 8-token rows would pad to 256
    (1, 256)
    >>> plan_chunks([8, 8, 500], 256)
    (3, 85)
    >>> plan_chunks([257], 256), plan_chunks([300], 1), plan_chunks([300], 1, single_tokens=True)
    ((1, 255), (0, 0), (1, 1))
    """
    room = room or [budget] * len(remaining)
    best, plan = 0, (0, 0)
    for rows in range(1, len(remaining) + 1):
        width = min(budget // rows, max(remaining[:rows]), min(room[:rows]))
        if not single_tokens:
            width = _without_single_tokens(remaining[:rows], width)
        if width < 1:
            break
        real = sum(min(r, width) for r in remaining[:rows])
        if real > best:
            best, plan = real, (rows, width)
    return plan


def _without_single_tokens(remaining: list[int], width: int) -> int:
    """The largest width <= ``width`` that leaves no row one token short and gives no row a one-token chunk
    (unless it is a one-token prompt alone in its step); 0 when there is none."""
    while width > 1 and any(r - width == 1 for r in remaining):
        width -= 1
    if len(remaining) == 1 and remaining[0] == 1:
        return width
    return width if width >= 2 and min(remaining) >= 2 else 0
