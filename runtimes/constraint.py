"""The grammar constraint of one request (the sampling chain's ``Constraint``), on an llguidance matcher.

Each decode step the matcher fills a packed bitmask of the tokens the grammar allows next (one bit per token,
int32 words, llguidance's layout); the row's logits are set to -inf where the bit is 0; the chosen token
advances the matcher; ``rollback`` undoes tokens a speculative step rejected. ``fill_bitmasks`` fills a whole
batch's masks in one call (llguidance's executor, in parallel, without the GIL), so constrained and free
requests share one decode step.

Closing JSON within the budget. A JSON string with no ``maxLength`` can grow until ``max_tokens`` (a model whose
output is noise picks the closing quote about once in 300 tokens), and a cut-off object does not parse. So once
the tokens left fall to ``reserve`` (twice what closing the whole document from its start takes, measured once
per grammar by ``closing_reserve``, plus a margin), a JSON constraint that is inside a string allows only
tokens that close it, when the grammar allows one there. Nothing else changes: outside strings the model still
chooses among what the grammar allows, and an output that fits the budget is never touched. vLLM and
llguidance have no such rule (their output is cut at ``max_tokens``); luffy adds it because a parseable
document is what a caller of a JSON schema asked for. ``wrapped_up`` says when it changed a choice.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import UsageError

OUTSIDE, IN_STRING, ESCAPED = 0, 1, 2  # where a JSON document's bytes are, as far as strings go
_SIMULATION_LIMIT = 4096  # tokens; a grammar that does not close within this gets the whole budget as reserve
_RESERVE_MARGIN = 16


def words(vocab: int) -> int:
    """int32 words of one packed bitmask row."""
    return (vocab + 31) // 32


class TokenTable:
    """Per tokenizer: how each token moves a JSON document in and out of strings, and the closing rule's preferred
    tokens: in a string those that close it (first byte a quote); outside, those that close a container or end
    the output, else a comma."""

    def __init__(self, tokenizer, vocab: int):
        self.vocab = vocab
        self.after = np.zeros((3, vocab), dtype=np.uint8)  # [state before, token] -> state after
        first = np.zeros(vocab, dtype=np.int16)  # each token's first byte (-1: no bytes)
        for token in range(vocab):
            data = tokenizer.decode_bytes([token])
            first[token] = data[0] if data else -1
            for state in (OUTSIDE, IN_STRING, ESCAPED):
                self.after[state, token] = _scan(state, data)
        closes_string = first == 0x22
        closes_container = (first == 0x7D) | (first == 0x5D)  # } or ], or the end of the sequence:
        closes_container[[t for t in tokenizer.eos_tokens if t < vocab]] = True  # no more parallel calls
        separates = first == 0x2C  # a comma ends a number or value and moves on to the next required one
        # the closing rule's choices in order, per string state: the first with an allowed token wins
        self.preferred = {IN_STRING: [closes_string], OUTSIDE: [closes_container, separates], ESCAPED: []}
        self.preferred_bits = {state: [pack(t) for t in tiers] for state, tiers in self.preferred.items()}


def _scan(state: int, data: bytes) -> int:
    if b'"' not in data and b"\\" not in data:  # most tokens: only an escape's next byte changes anything
        return IN_STRING if state == ESCAPED and data else state
    for byte in data:
        if state == ESCAPED:
            state = IN_STRING
        elif state == IN_STRING:
            state = OUTSIDE if byte == 0x22 else ESCAPED if byte == 0x5C else IN_STRING
        elif byte == 0x22:
            state = IN_STRING
    return state


class GrammarConstraint:
    """One request's grammar state: implements the sampling chain's ``Constraint`` protocol (``mask``,
    ``accept``, ``rollback``, ``is_finished``). ``reserve`` is None for grammars that are not JSON (no closing
    rule). A mask filled ahead for the current state (``BatchMasker.fill``) is used by ``mask`` as it is."""

    def __init__(self, matcher, tokens: TokenTable, max_tokens: int, reserve: int | None):
        self.matcher, self.tokens, self.max_tokens, self.reserve = matcher, tokens, max_tokens, reserve
        self.states = [OUTSIDE]  # the JSON string state after each accepted token
        self.wrapped_up = False
        self.row = np.empty(words(tokens.vocab), dtype=np.int32)  # the next token's packed mask, once filled
        self._moves = 0  # accepts and rollbacks so far: the mask in ``row`` is for the state after _filled_at
        self._filled_at = -1

    @property
    def accepted(self) -> int:
        return len(self.states) - 1

    def mask(self, logits: np.ndarray) -> None:
        """Set the tokens the grammar does not allow next to -inf in ``logits`` [vocab], in place."""
        if self._filled_at != self._moves:
            self.matcher.unsafe_compute_mask_ptr(self.row.ctypes.data, self.row.nbytes)
            self.filled(self.row)
        apply_bitmask(logits[None, :], self.row[None, :])

    def filled(self, row: np.ndarray) -> None:
        """Take ``row`` [words], llguidance's mask for the current state, as the next mask (applying the closing
        rule to it)."""
        if row is not self.row:
            self.row[:] = row
        self._filled_at = self._moves
        if self.reserve is None or self.max_tokens - self.accepted > self.reserve:
            return
        for tier in self.tokens.preferred_bits[self.states[-1]]:
            closing = self.row & tier
            if closing.any():
                self.wrapped_up = self.wrapped_up or not np.array_equal(closing, self.row)
                self.row[:] = closing
                return

    def accept(self, token: int) -> None:
        """Advance the grammar by the chosen ``token``; UsageError if the grammar does not allow it."""
        if not self.matcher.consume_token(int(token)):
            raise UsageError(f"token {token} is not allowed by the grammar here ({self.matcher.get_error()})")
        self.states.append(int(self.tokens.after[self.states[-1], token]))
        self._moves += 1

    def rollback(self, tokens: int) -> None:
        """Undo the last ``tokens`` accepted tokens (a speculative step rejected them)."""
        if tokens <= 0:
            return
        if tokens > self.accepted or not self.matcher.rollback(tokens):
            raise UsageError(f"cannot roll back {tokens} tokens: the grammar has accepted {self.accepted}")
        del self.states[-tokens:]
        self._moves += 1

    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing more (only the end of sequence)."""
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The output so far is a whole sentence of the grammar (it could end here)."""
        return self.matcher.is_accepting()


class BatchMasker:
    """A decode step's grammar masks filled in one llguidance call (in parallel, without the GIL) for every
    constrained row; each constraint's ``mask`` then applies its own when the logits chain reaches it.

    >>> masker = BatchMasker(engine.grammars.executor)   # doctest: +SKIP
    >>> masker.fill([constraint_a, constraint_b])         # doctest: +SKIP
    """

    def __init__(self, executor):
        self.executor = executor
        self._bitmask = np.empty((0, 0), dtype=np.int32)

    def fill(self, constraints: list[GrammarConstraint]) -> None:
        if not constraints:
            return
        width = constraints[0].row.size
        if self._bitmask.shape[0] < len(constraints) or self._bitmask.shape[1] != width:
            self._bitmask = np.empty((len(constraints), width), dtype=np.int32)
        fill_bitmasks(self.executor, constraints, self._bitmask[:len(constraints)])


def warn_incomplete(constraints: list | None, max_new_tokens: int) -> None:
    """Say which rows ran out of ``max_new_tokens`` before their grammar was complete (their output is cut)."""
    cut = [row for row, c in enumerate(constraints or []) if c is not None and not getattr(c, "complete", True)]
    if cut:
        warnings.warn(f"rows {cut}: max_new_tokens={max_new_tokens} ran out before the grammar was complete; their "
                      "output is cut off (raise max_new_tokens)", RuntimeWarning, stacklevel=3)


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """Set ``logits`` [rows, vocab] to -inf where ``bitmask`` [rows, words] has a 0 bit, in place."""
    vocab = logits.shape[-1]
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=-1, count=vocab, bitorder="little")
    logits[allowed == 0] = -np.inf


def fill_bitmasks(executor, constraints: list[GrammarConstraint], bitmask: np.ndarray) -> None:
    """Fill ``bitmask`` [len(constraints), words] with each constraint's next-token mask in one parallel call,
    and hand each constraint its row (with its closing rule applied)."""
    if bitmask.dtype != np.int32 or not bitmask.flags.c_contiguous:
        raise UsageError("the bitmask must be a C-contiguous int32 array")
    executor.unsafe_compute_mask_ptr([(c.matcher, i) for i, c in enumerate(constraints)], bitmask.ctypes.data,
                                     bitmask.shape[1] * 4, bitmask.shape[0])
    for i, constraint in enumerate(constraints):
        constraint.filled(bitmask[i])
        bitmask[i] = constraint.row


def closing_reserve(matcher, tokens: TokenTable, walks: int = 3, seed: int = 0) -> int:
    """Tokens to keep for closing a JSON document: twice the longest of a few completions from its start, plus a
    margin. Each completion follows the closing rule from the first token and otherwise picks uniformly among
    what the grammar allows (seeded), as a model whose output is noise would; a fixed pick does not do (the
    highest allowed digit runs 90.000... forever under a maximum of 90, the highest character fills an e-mail's
    local part without end)."""
    rng = np.random.default_rng(seed)
    row = np.empty(words(tokens.vocab), dtype=np.int32)
    longest = 0
    for _ in range(walks):
        probe, state, steps = matcher.deep_copy(), OUTSIDE, 0
        while not probe.is_accepting() and steps < _SIMULATION_LIMIT:
            probe.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            allowed = unpack(row, tokens.vocab)
            tiers = [allowed & tier for tier in tokens.preferred[state]]
            choice = np.flatnonzero(next((t for t in tiers if t.any()), allowed))
            if not choice.size:
                break
            token = int(rng.choice(choice))
            if not probe.consume_token(token):
                break
            state = int(tokens.after[state, token])
            steps += 1
        longest = max(longest, steps)
    return 2 * longest + _RESERVE_MARGIN


def pack(allowed: np.ndarray) -> np.ndarray:
    """A bool [vocab] array as a packed int32 bitmask row (llguidance's layout: bit i of word w is token 32w+i)."""
    padded = np.zeros(words(allowed.size) * 32, dtype=bool)
    padded[:allowed.size] = allowed
    return np.packbits(padded, bitorder="little").view(np.int32)


def unpack(row: np.ndarray, vocab: int) -> np.ndarray:
    """A packed int32 bitmask row as bool [vocab]."""
    return np.unpackbits(row.view(np.uint8), count=vocab, bitorder="little").astype(bool)
