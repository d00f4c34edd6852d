"""The grammar constraint of one request (the sampling chain's ``Constraint``), on an llguidance matcher.

Each decode step the matcher fills a packed bitmask of the tokens the grammar allows next (one bit per token,
int32 words, llguidance's layout); the chain sets the row's logits to -inf where the bit is 0; the chosen token
advances the matcher; ``rollback`` undoes tokens a speculative step rejected. The scheduler fills a decode
batch's masks ahead of the chain (``BatchMasker``), so constrained and free requests share one decode step. A
JSON constraint also follows the closing rule near the end of its token budget (runtimes/json_closing.py).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import UsageError
from .json_closing import OUTSIDE, ClosingRule, TokenTable, words


class GrammarConstraint:
    """One request's grammar state: implements the sampling chain's ``Constraint`` protocol (``mask``,
    ``accept``, ``rollback``, ``is_finished``). ``closing_need`` (tokens closing the document takes from its
    start) is None for grammars that are not JSON: no closing rule. A mask filled ahead for the current state
    (``BatchMasker.fill``) is used by ``mask`` as it is."""

    def __init__(self, matcher, tokens: TokenTable, max_tokens: int, closing_need: int | None):
        self.matcher, self.tokens, self.max_tokens = matcher, tokens, max_tokens
        self.closing = ClosingRule(tokens, closing_need, max_tokens) if closing_need is not None else None
        self.states = [OUTSIDE]  # the JSON string state after each accepted token
        self.row = np.empty(words(tokens.vocab), dtype=np.int32)  # the next token's packed mask, once filled
        self._moves = 0  # accepts and rollbacks so far: ``row`` is the mask after move _filled_at
        self._filled_at = -1

    @property
    def accepted(self) -> int:
        return len(self.states) - 1

    @property
    def wrapped_up(self) -> bool:
        """The closing rule narrowed a choice (the output was closed early to fit its budget)."""
        return self.closing is not None and self.closing.narrowed

    def mask(self, logits: np.ndarray) -> None:
        """Set the tokens the grammar does not allow next to -inf in ``logits`` [vocab], in place."""
        if self._filled_at != self._moves:
            self.matcher.unsafe_compute_mask_ptr(self.row.ctypes.data, self.row.nbytes)
            self.filled(self.row)
        apply_bitmask(logits[None, :], self.row[None, :])

    def filled(self, row: np.ndarray) -> None:
        """Take ``row`` [words], llguidance's mask for the current state, as the next mask (with the closing
        rule applied)."""
        if row is not self.row:
            self.row[:] = row
        self._filled_at = self._moves
        if self.closing is not None:
            self.closing.apply(self.row, self.states[-1], self.max_tokens - self.accepted)

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
    """Fills a decode step's grammar masks for every constrained row ahead of the logits chain, which then
    applies each row's own. By default the rows are filled one after another on the caller's thread; with
    ``parallel``, one llguidance call fills them all on its thread pool (``executor``). On a machine with few
    cores, where ONNX Runtime's pool threads spin between steps, handing the work to llguidance's threads cost
    10-15 ms per step against 0.14 ms filled here in turn (16 rows, llama-tiny, 2 cores), so ``parallel`` is
    only for machines with cores to spare (the server uses the default).

    >>> engine.grammars.masker().fill([constraint_a, constraint_b])   # doctest: +SKIP
    """

    def __init__(self, executor, parallel: bool = False):
        self.executor, self.parallel = executor, parallel
        self._bitmask = np.empty((0, 0), dtype=np.int32)

    def fill(self, constraints: list[GrammarConstraint]) -> None:
        if not self.parallel:
            for constraint in constraints:  # each call drops the GIL; no thread hand-off
                constraint.matcher.unsafe_compute_mask_ptr(constraint.row.ctypes.data, constraint.row.nbytes)
                constraint.filled(constraint.row)
            return
        width = constraints[0].row.size if constraints else 0
        if self._bitmask.shape[0] < len(constraints) or self._bitmask.shape[1] != width:
            self._bitmask = np.empty((len(constraints), width), dtype=np.int32)
        fill_bitmasks(self.executor, constraints, self._bitmask[:len(constraints)])


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


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """Set ``logits`` [rows, vocab] to -inf where ``bitmask`` [rows, words] has a 0 bit, in place."""
    vocab = logits.shape[-1]
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=-1, count=vocab, bitorder="little")
    logits[allowed == 0] = -np.inf


def warn_incomplete(constraints: list | None, max_new_tokens: int) -> None:
    """Say which rows ran out of ``max_new_tokens`` before their grammar was complete (their output is cut)."""
    cut = [row for row, c in enumerate(constraints or []) if c is not None and not getattr(c, "complete", True)]
    if cut:
        warnings.warn(f"rows {cut}: max_new_tokens={max_new_tokens} ran out before the grammar was complete; their "
                      "output is cut off (raise max_new_tokens)", RuntimeWarning, stacklevel=3)
