"""The closing rule: a JSON output that is about to run out of tokens closes instead of being cut off.

A JSON string with no ``maxLength`` can grow until ``max_tokens`` (a model whose output is noise picks the
closing quote about once in 300 tokens), and a cut-off document does not parse. So when the tokens left fall to
about twice what closing the document takes, the constraint narrows each mask to the tokens that
close it soonest, among those the grammar allows there (``TokenTable.preferred``): inside a string, a token whose
first byte is the closing quote; outside, one that closes an object or array or ends the output, else a comma
(which ends a number and moves on to the next required property). Nothing else changes: the model still
chooses among what the grammar allows, and an output that fits its budget is never touched. vLLM and
llguidance have no such rule (their output is cut at ``max_tokens``); luffy adds it because a document that
parses is what a caller of a JSON schema asked for, and says so (the request's ``closed_early``).

What "closing takes" is measured, not assumed: ``closing_need`` walks a copy of the matcher to the end a few
times under the rule, picking uniformly among the allowed one-byte tokens where the rule leaves a choice (as a
model whose output is noise would, one character at a time; multi-byte tokens would make a random walk through
a formatted string, an e-mail say, far longer than any model writes it), and returns the longest walk. It is
measured once per grammar, from the start (cached with it, off the scheduler's thread); the rule turns on when
the tokens left fall to twice that plus a margin, but never in the first half of the budget, so a small
``max_tokens`` does not force every string empty. (Measuring again from where a sequence stands cost a walk of
~100-300 steps on the scheduler's thread per request and check, 0.4 ms per decode step of 16 noise requests on
llama-tiny, for little: the first measure is the largest.)
"""

from __future__ import annotations

import numpy as np

OUTSIDE, IN_STRING, ESCAPED = 0, 1, 2  # where a JSON document's bytes are, as far as strings go
MARGIN = 16  # tokens kept beyond twice the measured need
WALK_LIMIT = 4096  # steps of one walk; a grammar that does not close within them gets this as its need


def words(vocab: int) -> int:
    """int32 words of one packed bitmask row."""
    return (vocab + 31) // 32


def pack(allowed: np.ndarray) -> np.ndarray:
    """A bool [vocab] array as a packed int32 bitmask row (llguidance's layout: bit i of word w is token 32w+i)."""
    padded = np.zeros(words(allowed.size) * 32, dtype=bool)
    padded[:allowed.size] = allowed
    return np.packbits(padded, bitorder="little").view(np.int32)


def unpack(row: np.ndarray, vocab: int) -> np.ndarray:
    """A packed int32 bitmask row as bool [vocab]."""
    return np.unpackbits(row.view(np.uint8), count=vocab, bitorder="little").astype(bool)


class TokenTable:
    """Per tokenizer: how each token moves a JSON document in and out of strings (``after``), the closing rule's
    preferred tokens per state, in order (``preferred``, and packed: ``preferred_bits``), and the one-byte
    tokens the walks pick from."""

    def __init__(self, tokenizer, vocab: int):
        self.vocab = vocab
        data = [tokenizer.decode_bytes([token]) for token in range(vocab)]
        first = np.array([d[0] if d else -1 for d in data], dtype=np.int16)
        self.single = np.array([len(d) == 1 for d in data], dtype=bool)
        # most tokens hold no quote and no backslash: only an escape's next byte changes anything
        self.after = np.zeros((3, vocab), dtype=np.uint8)
        self.after[IN_STRING] = IN_STRING
        self.after[ESCAPED] = np.where([bool(d) for d in data], IN_STRING, ESCAPED)
        for token in (t for t, d in enumerate(data) if b'"' in d or b"\\" in d):
            for state in (OUTSIDE, IN_STRING, ESCAPED):
                self.after[state, token] = _scan(state, data[token])
        closes_container = (first == 0x7D) | (first == 0x5D)  # } or ], or the end of the sequence:
        closes_container[[t for t in tokenizer.eos_tokens if t < vocab]] = True  # no more parallel calls
        self.preferred = {IN_STRING: [first == 0x22], OUTSIDE: [closes_container, first == 0x2C], ESCAPED: []}
        self.preferred_bits = {state: [pack(t) for t in tiers] for state, tiers in self.preferred.items()}
        self.single_bits = pack(self.single)


def _scan(state: int, data: bytes) -> int:
    for byte in data:
        if state == ESCAPED:
            state = IN_STRING
        elif state == IN_STRING:
            state = OUTSIDE if byte == 0x22 else ESCAPED if byte == 0x5C else IN_STRING
        elif byte == 0x22:
            state = IN_STRING
    return state


def narrow(row: np.ndarray, tokens: TokenTable, state: int) -> bool:
    """Narrow a packed mask ``row`` in place to the rule's first tier with an allowed token; True when that
    removed any allowed token."""
    for tier in tokens.preferred_bits[state]:
        closing = row & tier
        if closing.any():
            narrowed = not np.array_equal(closing, row)
            row[:] = closing
            return narrowed
    return False


def closing_need(matcher, tokens: TokenTable, state: int, limit: int = WALK_LIMIT, walks: int = 3,
                 seed: int = 0) -> int:
    """Tokens the longest of ``walks`` seeded walks under the closing rule takes from ``matcher``'s state (JSON
    string ``state``) to a complete document, each stopped at ``limit``."""
    rng = np.random.default_rng(seed)
    row = np.empty(words(tokens.vocab), dtype=np.int32)
    longest = 0
    for _ in range(walks):
        probe, where, steps = matcher.deep_copy(), state, 0
        while not probe.is_accepting() and steps < limit:
            probe.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            narrow(row, tokens, where)
            token = _random_token(row & tokens.single_bits if (row & tokens.single_bits).any() else row, rng)
            if token is None or not probe.consume_token(token):
                break
            where = int(tokens.after[where, token])
            steps += 1
        longest = max(longest, steps)
    return longest


def _random_token(row: np.ndarray, rng) -> int | None:
    """A uniform pick among the set bits of a packed row (unpacking only its non-zero words)."""
    used = np.flatnonzero(row)
    if not used.size:
        return None
    bits = np.flatnonzero(np.unpackbits(row[used].view(np.uint8), bitorder="little"))
    bit = int(bits[rng.integers(bits.size)])
    return int(used[bit // 32]) * 32 + bit % 32


class ClosingRule:
    """One sequence's use of the rule: on once its tokens left fall to twice the measured need plus a margin, but
    never in the first half of its budget (a small ``max_tokens`` must not force every string empty)."""

    def __init__(self, tokens: TokenTable, need: int, max_tokens: int):
        self.tokens, self.narrowed = tokens, False
        self.starts_at = min(2 * need + MARGIN, max_tokens // 2)  # tokens left

    def apply(self, row: np.ndarray, state: int, left: int) -> None:
        """Narrow the freshly filled mask ``row`` when the rule is on."""
        if left <= self.starts_at:
            self.narrowed = narrow(row, self.tokens, state) or self.narrowed
