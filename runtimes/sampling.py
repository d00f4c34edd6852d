"""Next-token selection on numpy logits, with transformers' semantics (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def select_next(
    logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float, rng: np.random.Generator
) -> np.ndarray:
    """Pick one token per row of ``logits`` [batch, vocab]; processors run in transformers' order."""
    if not do_sample:
        return np.argmax(logits, axis=-1)
    return sample(processed_probs(logits, temperature, top_k, top_p), rng)


def processed_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution sampling draws from: temperature, then top-k, then top-p (transformers' order), softmax.
    Speculative decoding's acceptance rule compares the target's and the draft's of these."""
    scores = logits.astype(np.float32, copy=True)
    if temperature != 1.0:
        scores /= temperature
    if top_k and top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
        scores[scores < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(scores, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(_softmax(sorted_scores), axis=-1)
        remove_sorted = cumulative <= (1.0 - top_p)
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        scores[remove] = -np.inf
    return _softmax(scores)


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``probs`` [batch, vocab]: inverse-CDF with one uniform draw per row, reproducible
    under a seed."""
    draws = rng.random(probs.shape[0])[:, None]
    cdf = np.cumsum(probs, axis=-1)
    picked = (cdf < draws * cdf[:, -1:]).sum(axis=-1)
    return np.minimum(picked, probs.shape[-1] - 1)


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Sampling:
    """How tokens are chosen (Engine.generate's arguments), and the stop tokens min_new_tokens masks."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos: np.ndarray
    min_new_tokens: int

    def logits_at(self, logits: np.ndarray, produced: int) -> np.ndarray:
        """``logits`` [vocab] with EOS masked while fewer than min_new_tokens are out."""
        if produced < self.min_new_tokens and self.eos.size:
            logits = logits.copy()
            logits[self.eos] = -np.inf
        return logits

    def probs(self, logits: np.ndarray, produced: int) -> np.ndarray:
        return processed_probs(self.logits_at(logits, produced)[None, :], self.temperature, self.top_k, self.top_p)[0]

    def choose(self, logits: np.ndarray, produced: int, rng) -> int:
        """The next token from ``logits`` [vocab], as Engine.generate chooses it."""
        return int(select_next(self.logits_at(logits, produced)[None, :], self.do_sample, self.temperature, self.top_k,
                               self.top_p, rng)[0])
