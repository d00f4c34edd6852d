"""A request in the scheduler: its sampling parameters, its state, and how it decides to stop.

Parameters use the names of OpenAI's API and vLLM's extras (``max_tokens``, ``min_tokens``, ``stop``,
``stop_token_ids``, ``ignore_eos``, ``seed``, the penalties, ``logit_bias``, ``min_p``); tokens are chosen
through ``Engine.generate``'s logits chain (runtimes/sampling.py), so a request with the same parameters gives
the same tokens here as ``Engine.generate`` gives it alone.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from ..errors import UsageError
from ..runtimes.sampling import GREEDY_BELOW, Constraint, Sampling, TokenChooser
from .detokenize import IncrementalDetokenizer

_ids = itertools.count()
SEED_LIMIT = 1 << 64  # numpy's default_rng takes seeds in [0, 2**64); the HTTP edge maps OpenAI's signed ones here


class ParameterError(UsageError):
    """A request parameter outside what the model or luffy allows; ``param`` names the field (OpenAI's
    ``error.param``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default max_logprobs; OpenAI's chat allows 20)


class TokenLogprob(NamedTuple):
    """A token, its logprob (the log-softmax of the model's raw logits) and the top alternatives [(id, logprob)]."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: np.ndarray, tokens: list[int], top: int) -> list[TokenLogprob]:
    """One TokenLogprob per row of ``logits`` [n, vocab] for the token that followed it, with ``top``
    alternatives, best first: logit - logsumexp(row), the log-softmax without materializing it (one pass of
    exp over the vocabulary, then a partial sort of the logits themselves, whose order is the logprobs')."""
    logits = np.asarray(logits, dtype=np.float32)
    peak = logits.max(axis=-1, keepdims=True)
    norm = peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))  # logsumexp per row
    rows = np.arange(len(tokens))
    chosen = logits[rows, tokens] - norm[:, 0]
    alternatives = [[] for _ in tokens]
    if top:
        top = min(top, logits.shape[-1])
        kth = np.partition(logits, -top, axis=-1)[:, -top]  # values only: twice as fast as argpartition
        for i in rows:
            best = np.flatnonzero(logits[i] >= kth[i])
            best = best[np.argsort(-logits[i, best], kind="stable")[:top]]
            alternatives[i] = list(zip(best.tolist(), (logits[i, best] - norm[i, 0]).tolist()))
    return [TokenLogprob(int(t), float(chosen[i]), alternatives[i]) for i, t in enumerate(tokens)]


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 (below 1e-5) is greedy (OpenAI's convention); otherwise sampling with ``top_k``/
    ``top_p``/``min_p`` as in transformers, reproducible under ``seed``. ``repetition_penalty`` (transformers'),
    ``presence_penalty``/``frequency_penalty`` and ``logit_bias`` (OpenAI's) apply first (runtimes/sampling.py)."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # per output token: its logprob and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (skips the prefix cache)

    def __post_init__(self):
        if self.max_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ParameterError("max_tokens", f"max_tokens must be >= 1 (0 only to score a prompt), got "
                                               f"{self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= MAX_LOGPROBS:
                raise ParameterError(name, f"{name} must be in [0, {MAX_LOGPROBS}], got {getattr(self, name)}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ParameterError("min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                               f"got {self.min_tokens}")
        if not 0 <= self.temperature < float("inf"):  # also refuses NaN
            raise ParameterError("temperature", f"temperature must be a finite number >= 0, got {self.temperature}")
        if any(not s for s in self.stop):
            raise ParameterError("stop", "stop strings must not be empty")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ParameterError("seed", f"seed must be in [0, 2**64) (numpy's generator), got {self.seed}")
        self._check_chain()  # top_p, top_k, min_p, the penalties, the biases' range

    def check(self, vocab: int) -> None:
        """Refuse token ids the model does not have (before the request reaches a scheduler step)."""
        bad = next((t for t in self.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ParameterError("stop_token_ids", f"stop_token_ids: token id {bad} is outside the vocabulary of "
                                                   f"size {vocab}")
        self._check_chain(vocab)  # logit_bias ids inside the vocabulary

    def _check_chain(self, vocab: int | None = None) -> None:
        """The logits chain's own checks, as ParameterErrors: its messages begin with the field they name."""
        try:
            self.sampling(()).check(vocab)
        except UsageError as exc:
            raise ParameterError(str(exc).split()[0].rstrip(":"), str(exc)) from None

    def sampling(self, stop_ids) -> Sampling:
        """The logits chain's parameters for this request; ``stop_ids`` are what min_tokens masks."""
        return Sampling(not self.greedy, self.temperature or 1.0, self.top_k, self.top_p, self.min_p,
                        self.repetition_penalty, self.presence_penalty, self.frequency_penalty, dict(self.logit_bias),
                        np.asarray(stop_ids, dtype=np.int64), self.min_tokens)

    @functools.cached_property
    def longest_stop(self) -> int:
        """The longest stop string's length (0 without any): how much text a stop string could still complete."""
        return max(map(len, self.stop), default=0)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class Output:
    """What one scheduler iteration produced for a request: new token ids and the text they complete.
    ``finish_reason`` is set on the last one: "stop", "length", "abort" (cancelled) or "error"."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    grammar: str | None = None  # a constrained request's last Output: "complete", "closed_early" or "incomplete"
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first Output: None for the first prompt token

    @staticmethod
    def merge(outputs: list["Output"]) -> "Output":
        """One Output for several in a row of one request: their tokens and text, the last one's state."""
        last = outputs[-1]
        logprobs = None if outputs[0].logprobs is None and last.logprobs is None else [
            entry for o in outputs for entry in (o.logprobs or [])]
        prompt = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
        return Output(last.request_id, [t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs),
                      last.finish_reason, last.prompt_tokens, last.completion_tokens, last.error, last.grammar,
                      logprobs, prompt)


@dataclass(eq=False)
class Request:
    """One generation: the prompt, its parameters and ``emit(Output)``, called from the scheduler's thread."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Output], None]
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.monotonic)
    # state, owned by the scheduler thread
    slot: int | None = None
    prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    next_input: int | None = None
    cancelled: bool = False
    finish_reason: str | None = None
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    text: str = ""
    emitted_chars: int = 0
    detokenizer: IncrementalDetokenizer | None = None
    rng: np.random.Generator | None = None
    stop_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    constraint: Constraint | None = None  # the request's grammar (structured outputs), None for free text
    chooser: TokenChooser | None = None  # how tokens are chosen (the logits chain and its state), set by start()
    spec_k: object = None  # speculative decoding's adaptive proposal length (serving/speculation.py)
    siblings: list["Request"] = field(default_factory=list)  # n > 1: the other choices, prefilled from this one
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled chunk by chunk when params ask
    swapped: object = None  # preempted: its KV in host memory until it resumes (serving/kv_pool.py SwappedKV)
    preemptions: int = 0

    def start(self, tokenizer, eos_ids: tuple[int, ...]) -> None:
        """Set up the per-request state the first time the scheduler touches it."""
        self.rng = np.random.default_rng(self.params.seed)
        self.stop_ids = np.array(sorted(set(self.params.stop_token_ids) | (set() if self.params.ignore_eos
                                                                           else set(eos_ids))), dtype=np.int64)
        self.chooser = TokenChooser(self.params.sampling(self.stop_ids), self.prompt_ids, self.constraint)
        if tokenizer is not None:
            self.detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_ids)

    def context_ids(self) -> list[int]:
        """What the KV cache holds once the prompt is in: the prompt, then every output token but the last (the
        next step's input). A request preempted without a host copy of its KV prefills all of it again."""
        return self.prompt_ids + self.output_ids[:-1]

    def choose(self, logits: np.ndarray) -> int:
        """The next token from this request's logits [vocab], as Engine.generate would choose it alone."""
        return self.chooser.choose(logits, self.rng)

    def book_prompt_logprobs(self, start: int, logits: np.ndarray) -> None:
        """Record the logprobs of the prompt tokens that ``logits`` [chunk, vocab] (the positions from ``start``
        on) predict: position p predicts prompt token p + 1; the last prompt position predicts no prompt token."""
        if self.prompt_logprobs is None:
            self.prompt_logprobs = [None]  # the first prompt token has no context to be predicted from
        following = self.prompt_ids[start + 1:start + 1 + len(logits)]
        self.prompt_logprobs += token_logprobs(logits[:len(following)], following, self.params.prompt_logprobs)

    def accept(self, token: int, logits: np.ndarray | None = None) -> Output:
        """Book a chosen token, ``logits`` [vocab] the model's raw ones it was chosen from (for logprobs); returns
        the Output to emit (finish_reason set when this token ends it)."""
        entry = None
        if self.params.logprobs is not None and logits is not None:
            entry = token_logprobs(logits[None, :], [token], self.params.logprobs)
        self.output_ids.append(token)
        self.chooser.accept(token)
        self.next_input = token
        delta = self.detokenizer.add([token]) if self.detokenizer is not None else ""
        self.text += delta
        if (self.stop_ids.size and token in self.stop_ids) or self.chooser.finished:
            self.finish_reason = "stop"
        elif self.params.stop and delta and self._stop_string(len(delta)):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.detokenizer is not None and self.finish_reason == "length":
            self.text += self.detokenizer.flush()
        return Output(self.request_id, [token], self._releasable_text(), self.finish_reason, len(self.prompt_ids),
                      len(self.output_ids), grammar=self.grammar_state(), logprobs=entry,
                      prompt_logprobs=self._take_prompt_logprobs())

    def grammar_state(self) -> str | None:
        """How a finished constrained output stands: complete, closed early by the budget, or cut off."""
        if self.constraint is None or self.finish_reason is None:
            return None
        if not self.constraint.complete:
            return "incomplete"
        return "closed_early" if self.constraint.wrapped_up else "complete"

    def _take_prompt_logprobs(self):
        """The prompt's logprobs, handed out once (with the first Output)."""
        taken, self.prompt_logprobs = self.prompt_logprobs, None
        return taken

    def _stop_string(self, added: int) -> bool:
        """Truncate the text at the first stop string that the last ``added`` characters completed."""
        begin = max(0, len(self.text) - added - self.params.longest_stop + 1)  # earlier text was checked when it arrived
        hits = [at for at in (self.text.find(stop, begin) for stop in self.params.stop) if at != -1]
        if not hits:
            return False
        self.text = self.text[:min(hits)]  # OpenAI: the stop string is not part of the output
        return True

    def _releasable_text(self) -> str:
        """New text that can be streamed now: while a stop string could still complete, its possible start is
        held back (at most the longest stop string minus one character)."""
        end = len(self.text)
        if self.finish_reason is None and self.params.stop:
            end = max(self.emitted_chars, end - (self.params.longest_stop - 1))
        delta = self.text[self.emitted_chars:end]
        self.emitted_chars = end
        return delta

    def finish(self, reason: str, error: str | None = None) -> Output:
        self.finish_reason = reason
        return Output(self.request_id, [], self._releasable_text(), reason, len(self.prompt_ids), len(self.output_ids),
                      error, prompt_logprobs=self._take_prompt_logprobs())
