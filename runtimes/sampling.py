"""The one logits-processing chain: how every decoding path turns a row of logits into the next token.

Engine.generate (Hugging Face's argument names), the serving scheduler's requests (OpenAI's and vLLM's names)
and speculative decoding's acceptance rule all choose through a ``TokenChooser``, which applies, in order:

  1. penalties: ``repetition_penalty`` (transformers' RepetitionPenaltyLogitsProcessor: over the prompt and the
     output so far, a positive logit is divided by it, a negative one multiplied), then ``frequency_penalty``
     and ``presence_penalty`` (OpenAI's: ``logit -= frequency * count + presence * (count > 0)``, counting the
     output tokens only);
  2. ``logit_bias`` (OpenAI's: token id -> bias in [-100, 100], added);
  3. the grammar mask: the sequence's optional ``Constraint`` sets the tokens it does not allow to -inf;
  4. ``min_tokens``: the stop/EOS ids are masked while fewer than ``min_tokens`` tokens are out;
  5. temperature (below ``GREEDY_BELOW`` it means greedy), top_k, top_p, min_p (transformers' warpers, in
     transformers' order), then argmax or one seeded uniform draw.

Steps 1-4 change the scores greedy decoding takes the argmax of; step 5 only shapes the distribution a draw
comes from. logprobs are not the chain's: they are the log-softmax of the model's raw logits (``logprobs``).
Neutral values (penalties 1/0/0, no bias, no constraint, min_p 0) leave the row untouched and uncopied, so
tokens are exactly what they were before the chain had those steps.

Per-sequence state (the tokens seen for the penalties, the constraint, how many tokens are out) lives in the
sequence's ``TokenChooser``; the random generator is the caller's (a served request owns its own, a batched
``Engine.generate`` shares one across rows, one draw per row per step, as before).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import UsageError

GREEDY_BELOW = 1e-5  # a temperature under this divides logits into inf/NaN territory: treat it as greedy


@runtime_checkable
class Constraint(Protocol):
    """A grammar that limits which tokens may come next (structured outputs implement it with llguidance)."""

    def mask(self, logits: np.ndarray) -> None:
        """Set the tokens not allowed next to -inf in ``logits`` ([vocab] float32), in place."""

    def accept(self, token: int) -> None:
        """The chosen token advances the grammar."""

    def rollback(self, tokens: int) -> None:
        """Undo the last ``tokens`` accepted (speculative decoding's rejected drafts)."""

    def is_finished(self) -> bool:
        """The grammar is complete: the sequence ends (finish reason "stop")."""


@dataclass(frozen=True)
class Sampling:
    """The chain's parameters for one sequence (validated by ``check``).

    >>> Sampling(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1).greedy
    False
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # what min_tokens masks
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def check(self, vocab: int | None = None) -> "Sampling":
        """Refuse values no path can honour, in one line naming the argument; returns self."""
        if self.do_sample and not self.temperature > 0:
            raise UsageError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise UsageError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise UsageError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for token, bias in self.logit_bias.items():
            if vocab is not None and not 0 <= token < vocab:
                raise UsageError(f"logit_bias: token id {token} is outside the vocabulary of size {vocab}")
            if not -100.0 <= bias <= 100.0:
                raise UsageError(f"logit_bias: bias {bias} for token {token} must be in [-100, 100]")
        return self


class TokenChooser:
    """One sequence's way through the chain: its ``Sampling`` plus the state the steps need.

    >>> chooser = TokenChooser(Sampling(repetition_penalty=1.3), prompt_ids=[256, 72])   # doctest: +SKIP
    >>> token = chooser.choose(logits_row, rng); chooser.accept(token)                 # doctest: +SKIP
    """

    def __init__(self, sampling: Sampling, prompt_ids: Sequence[int] = (), constraint: Constraint | None = None):
        self.sampling, self.constraint = sampling, constraint
        self.output: list[int] = []
        self._counts: Counter[int] = Counter()  # output token -> times (presence, frequency and repetition)
        self._prompt = np.unique(np.asarray(prompt_ids, dtype=np.int64)) if sampling.repetition_penalty != 1.0 else None
        self._bias_ids = np.fromiter(sampling.logit_bias, dtype=np.int64, count=len(sampling.logit_bias))
        self._bias = np.fromiter(sampling.logit_bias.values(), dtype=np.float32, count=len(sampling.logit_bias))

    @property
    def produced(self) -> int:
        return len(self.output)

    @property
    def finished(self) -> bool:
        """The constraint is complete (never without one)."""
        return self.constraint is not None and self.constraint.is_finished()

    @property
    def neutral(self) -> bool:
        """No step of 1-4 applies to the next token: ``scores`` returns the row itself."""
        s = self.sampling
        masking = self.produced < s.min_tokens and s.stop_ids.size
        return not (s.penalized or self._bias.size or self.constraint is not None or masking)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Steps 1-4 on one row [vocab]: a float32 copy when any step applies, ``logits`` itself when none does."""
        if self.neutral:
            return logits
        s = self.sampling
        scores = np.array(logits, dtype=np.float32, copy=True)
        if s.penalized:
            self._penalize(scores)
        if self._bias.size:
            scores[self._bias_ids] += self._bias
        if self.constraint is not None:
            self.constraint.mask(scores)
        if self.produced < s.min_tokens:
            scores[s.stop_ids] = -np.inf
        return scores

    def _penalize(self, scores: np.ndarray) -> None:
        s = self.sampling
        out_ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
        if s.repetition_penalty != 1.0:
            seen = np.union1d(self._prompt, out_ids)
            picked = scores[seen]
            scores[seen] = np.where(picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty)
        if out_ids.size and (s.frequency_penalty or s.presence_penalty):
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            scores[out_ids] -= s.frequency_penalty * counts + s.presence_penalty

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a draw takes from this row (steps 1-5); speculative decoding's p and q."""
        return warped_probs(self.scores(logits)[None, :], self.sampling)[0]

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        """The next token from one row of logits [vocab]; does not accept it."""
        if self.sampling.greedy:
            return int(np.argmax(self.scores(logits)))
        return int(sample(self.probs(logits)[None, :], rng)[0])

    def accept(self, token: int) -> None:
        """Book a chosen token: it counts for the penalties and advances the constraint."""
        self.output.append(token)
        self._counts[token] += 1
        if self.constraint is not None:
            self.constraint.accept(token)

    def rollback(self, tokens: int) -> None:
        """Undo the last ``tokens`` accepted (rejected speculative drafts)."""
        if tokens <= 0:
            return
        for token in self.output[-tokens:]:
            self._counts[token] -= 1
            if not self._counts[token]:
                del self._counts[token]
        del self.output[-tokens:]
        if self.constraint is not None:
            self.constraint.rollback(tokens)


def choose_rows(choosers: list[TokenChooser], logits: np.ndarray, rng: np.random.Generator,
                skip: np.ndarray | None = None) -> np.ndarray:
    """One token per row of ``logits`` [batch, vocab] for rows that share one ``Sampling`` (a batched
    Engine.generate): each row through its chooser's steps 1-4, then one argmax or one draw per row. Rows
    where ``skip`` is True (finished) are not processed; their token is the caller's to discard."""
    scores = logits
    busy = [i for i, c in enumerate(choosers) if not c.neutral and (skip is None or not skip[i])]
    if busy:
        scores = np.array(logits, dtype=np.float32, copy=True)
        for i in busy:
            scores[i] = choosers[i].scores(logits[i])
    sampling = choosers[0].sampling
    if sampling.greedy:
        return np.argmax(scores, axis=-1)
    return sample(warped_probs(scores, sampling), rng)


def warped_probs(scores: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Step 5's distribution over ``scores`` [batch, vocab]: temperature, top-k, top-p, min-p (transformers'
    order), softmax."""
    scores = scores.astype(np.float32, copy=True)
    if sampling.temperature != 1.0:
        scores /= sampling.temperature
    top_k = sampling.top_k
    if top_k and top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
        scores[scores < kth] = -np.inf
    if sampling.top_p < 1.0:
        order = np.argsort(scores, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(_softmax(sorted_scores), axis=-1)
        remove_sorted = cumulative <= (1.0 - sampling.top_p)
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        scores[remove] = -np.inf
    if sampling.min_p > 0.0:  # transformers' MinPLogitsWarper: below min_p x the top probability goes
        probs = _softmax(scores)
        scores[probs < sampling.min_p * probs.max(axis=-1, keepdims=True)] = -np.inf
    return _softmax(scores)


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``probs`` [batch, vocab]: inverse-CDF with one uniform draw per row, reproducible
    under a seed."""
    draws = rng.random(probs.shape[0])[:, None]
    cdf = np.cumsum(probs, axis=-1)
    picked = (cdf < draws * cdf[:, -1:]).sum(axis=-1)
    return np.minimum(picked, probs.shape[-1] - 1)


def logprobs(logits: np.ndarray) -> np.ndarray:
    """The log-softmax of raw logits [..., vocab] in float32 (what the API's logprobs report)."""
    shifted = np.asarray(logits, dtype=np.float32) - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)
