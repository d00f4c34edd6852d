"""Speculative decoding: a cheap source proposes tokens, the target checks them all in one step.

Batch-1 decode reads every weight once per token; verifying K proposed tokens costs about one such read, so
each accepted token past the first is nearly free. Two sources, with Hugging Face's names:
  - ``assistant_model``: a draft artifact with the same vocabulary (typically the int8 or int4 build of the
    same model), run greedily or sampled from its own distribution;
  - ``prompt_lookup_num_tokens``: the tokens that followed the last n-gram where it occurred earlier in the
    prompt or output (transformers' prompt-lookup candidate generator), which costs nothing.
The number of proposed tokens adapts like transformers' "heuristic" schedule: +2 after a round where all were
accepted, -1 otherwise (at least 1), so a poor source costs little; unlike transformers', it never exceeds the
number asked for (see OrtEngine._speculative for why).

Proposals and checks go through the sequence's TokenChooser (runtimes/sampling.py's chain: penalties, bias,
grammar, min_tokens, warpers), advanced over each proposed token as it is drafted or checked and rolled back
after, so position i is judged with the state the sequence has once tokens before it are kept; the caller
then accepts the tokens kept.

Acceptance: greedy keeps the draft tokens the target's argmax agrees with, then adds the target's own next
token, so the output is exactly plain greedy's. Sampling uses the rejection rule of Leviathan et al. (2023) and
Chen et al. (2023): keep draft token x with probability min(1, p(x)/q(x)), else draw from max(0, p - q)
renormalized; a source without a distribution (prompt lookup) has q = 1 on its token. Either way every output
token is distributed as the target's own. Rejected positions are rolled back by truncating the KV slots.

``speculate_rows`` verifies several rows in one target step where the graph takes several rows of several
tokens with a cache (GroupQueryAttention's query_seqlens); ``generate`` verifies its rows one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from .sampling import Sampling, TokenChooser, sample


@dataclass
class Stats:
    """What speculation did over one generate call (``engine.generation_stats``)."""

    source: str
    target_steps: int = 0  # verification steps (and plain steps when nothing was proposed)
    drafted: int = 0
    accepted: int = 0
    generated: int = 0

    def to_json(self) -> dict:
        return {
            "source": self.source, "target_steps": self.target_steps, "draft_tokens": self.drafted,
            "accepted_tokens": self.accepted, "generated_tokens": self.generated,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_tokens_per_target_step": self.generated / self.target_steps if self.target_steps else None,
        }


@dataclass
class AdaptiveK:
    """transformers' "heuristic" schedule for the number of proposed tokens."""

    k: int
    adaptive: bool = True

    def __post_init__(self):
        self.limit = self.k  # K never exceeds the number asked for (see OrtEngine._speculative for why)

    def update(self, proposed: int, accepted: int) -> None:
        if self.adaptive and proposed:
            self.k = min(self.limit, self.k + 2) if accepted == proposed else max(1, self.k - 1)


@dataclass
class PromptLookup:
    """Proposals copied from the context: the continuation of the earliest earlier occurrence of the last
    n-gram, n from ``max_ngram`` down to 1 (transformers' PromptLookupCandidateGenerator)."""

    max_ngram: int = 2
    name: str = "prompt-lookup"

    def propose(self, row: int, seq: list[int], k: int, chooser: TokenChooser, rng):
        arr = np.asarray(seq)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = arr[-n:]
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # every earlier n-gram
            for start in np.flatnonzero((windows == tail).all(axis=1)):
                follow = arr[start + n:start + n + k]
                if follow.size:
                    return [int(t) for t in follow], None
        return [], None

    def rollback(self, row: int, kept: int) -> None:
        pass  # nothing to roll back: proposals are read from the sequence itself

    def clear(self, row: int) -> None:
        pass

    def swap(self, a: int, b: int) -> None:
        pass


@dataclass
class DraftModel:
    """Proposals from a draft engine with its own KV slots (one per row), holding seq[:length[row]]."""

    engine: object
    rows: int
    capacity: int
    name: str = "draft"
    slots: object = None
    length: list = field(default_factory=list)

    def __post_init__(self):
        self.slots = self.engine.open_slots(self.rows, self.capacity)
        self.length = [0] * self.rows

    def propose(self, row: int, seq: list[int], k: int, chooser: TokenChooser, rng):
        tokens, dists = [], []
        feed = seq[self.length[row]:]  # what the draft has not seen: the last token, maybe one more
        try:
            for _ in range(k):
                if chooser.finished:  # the grammar is complete: nothing can follow
                    break
                logits = self.slots.step(row, row + 1, np.array([feed], dtype=np.int64))[0, -1]
                self.length[row] += len(feed)
                if chooser.sampling.greedy:
                    token = int(np.argmax(chooser.scores(logits)))
                else:
                    q = chooser.probs(logits)
                    token = int(sample(q[None, :], rng)[0])
                    dists.append(q)
                chooser.accept(token)  # the next draft position sees this one (penalties, grammar)
                tokens.append(token)
                feed = [token]
        finally:
            chooser.rollback(len(tokens))
        return tokens, (np.stack(dists) if dists else None)

    def rollback(self, row: int, kept: int) -> None:
        """Keep the draft's first ``kept`` positions (what the target accepted)."""
        if self.length[row] > kept:
            self.slots.cache.truncate(row, kept)
            self.length[row] = kept

    def clear(self, row: int) -> None:
        """Forget what ``row`` held (its slot now serves another sequence); the next propose feeds it all."""
        self.slots.cache.clear(row)
        self.length[row] = 0

    def swap(self, a: int, b: int) -> None:
        self.slots.cache.swap(a, b)
        self.length[a], self.length[b] = self.length[b], self.length[a]



def accept_greedy(logits: np.ndarray, proposed: list[int], chooser: TokenChooser) -> tuple[int, int]:
    """(accepted count, next token): the target's argmax at each position, while it agrees with the proposal.
    ``chooser`` is left as it was."""
    accepted = 0
    try:
        for token in proposed:
            choice = int(np.argmax(chooser.scores(logits[accepted])))
            if choice != token:
                return accepted, choice
            chooser.accept(token)
            accepted += 1
        return accepted, int(np.argmax(chooser.scores(logits[accepted])))
    finally:
        chooser.rollback(accepted)


def accept_sampled(logits: np.ndarray, proposed: list[int], q: np.ndarray | None, chooser: TokenChooser,
                   rng) -> tuple[int, int]:
    """(accepted count, next token) by the rejection rule; ``q`` [k, vocab] is the draft's distributions (None:
    a deterministic proposal, q = 1 on its token). ``chooser`` is left as it was."""
    accepted = 0
    try:
        for i, token in enumerate(proposed):
            p = chooser.probs(logits[i])
            q_token = 1.0 if q is None else float(q[i, token])  # > 0: the draft drew this token from q
            if rng.random() < min(1.0, float(p[token]) / q_token):
                chooser.accept(token)
                accepted += 1
                continue
            return i, int(sample(_residual(p, None if q is None else q[i], token)[None, :], rng)[0])
        p = chooser.probs(logits[len(proposed)])
        return len(proposed), int(sample(p[None, :], rng)[0])
    finally:
        chooser.rollback(accepted)


def _residual(p: np.ndarray, q: np.ndarray | None, token: int) -> np.ndarray:
    """Where a rejected draft's next token is drawn from: max(0, p - q) renormalized (q = 1 on ``token`` for a
    proposal without a distribution); p itself when nothing is left."""
    if q is None:
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    return residual / total if total > 0 else p


def check_draft(target, draft) -> None:
    """A draft must speak the target's vocabulary (same size, same tokenizer file when both have one)."""
    if draft.kind != "causal-lm" or not hasattr(draft, "open_slots"):
        raise UsageError(f"assistant_model {getattr(draft, 'path', draft)}: not a causal-LM engine")
    if draft.vocab != target.vocab:
        raise UsageError(f"assistant_model {draft.path}: vocabulary of {draft.vocab} tokens; the target's has "
                         f"{target.vocab} (a draft must use the same tokenizer)")
    mine, theirs = target.manifest.get("files", {}), draft.manifest.get("files", {})
    name_t, name_d = target.manifest.get("tokenizer"), draft.manifest.get("tokenizer")
    if name_t and name_d and mine[name_t]["sha256"] != theirs[name_d]["sha256"]:
        raise UsageError(f"assistant_model {draft.path}: its tokenizer.json differs from the target's "
                         "(a draft must use the same tokenizer)")


def speculate_round(slots, slot: int, seq: list[int], remaining: int, source, k: AdaptiveK, chooser: TokenChooser,
                    rng) -> tuple[list[int], int, int, np.ndarray]:
    """One round for ``seq`` (prompt and output so far, the output booked in ``chooser``) in ``slot``, whose
    cache holds seq[:-1], with ``remaining`` output tokens still allowed: propose at most K of them less one,
    verify all in one target step, accept, and roll the target's slot and the source back to what was kept.
    Returns (proposed, accepted count n, the target's next token, the verify step's logits [n proposed + 1,
    vocab]); the tokens kept are proposed[:n] and then that token, which the caller accepts into ``chooser``."""
    proposed, q = _propose(slot, seq, remaining, source, k, chooser, rng)
    verify = slots.step(slot, slot + 1, np.array([[seq[-1], *proposed]], dtype=np.int64), keep=len(proposed) + 1)[0]
    n, token = _settle(slots, slot, seq, proposed, q, verify, source, k, chooser, rng)
    return proposed, n, token, verify


def speculate_rows(slots, rows: list[tuple], source) -> list[tuple[list[int], int, int, np.ndarray]]:
    """``speculate_round`` for slots [0, len(rows)) together: each row proposes, then one target step verifies
    every row's proposals (a multi-row graph: rows of several tokens with a cache, right-padded). ``rows``:
    per slot (seq, remaining, k, chooser, rng); returns per slot what speculate_round returns."""
    proposals = [_propose(slot, seq, remaining, source, k, chooser, rng)
                 for slot, (seq, remaining, k, chooser, rng) in enumerate(rows)]
    counts = [len(proposed) + 1 for proposed, _ in proposals]
    width = max(counts)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for slot, ((seq, *_), (proposed, _)) in enumerate(zip(rows, proposals)):
        ids[slot, :counts[slot]] = [seq[-1], *proposed]
    verify = slots.step(0, len(rows), ids, keep=width, counts=counts)  # each row's own last positions, right-aligned
    results = []
    for slot, ((seq, _, k, chooser, rng), (proposed, q)) in enumerate(zip(rows, proposals)):
        logits = verify[slot, width - counts[slot]:]
        n, token = _settle(slots, slot, seq, proposed, q, logits, source, k, chooser, rng)
        results.append((proposed, n, token, logits))
    return results


def _propose(slot: int, seq: list[int], remaining: int, source, k: AdaptiveK, chooser: TokenChooser, rng):
    budget = min(k.k, remaining - 1)  # a round never proposes past the output's budget
    return source.propose(slot, seq, budget, chooser, rng) if budget > 0 else ([], None)


def _settle(slots, slot: int, seq: list[int], proposed: list[int], q, verify: np.ndarray, source, k: AdaptiveK,
            chooser: TokenChooser, rng) -> tuple[int, int]:
    """Accept from the target's ``verify`` logits [proposed + 1, vocab], then roll the slot and the source back to
    what was kept; (accepted count, the target's next token)."""
    if chooser.sampling.greedy:
        n, token = accept_greedy(verify, proposed, chooser)
    else:
        n, token = accept_sampled(verify, proposed, q, chooser, rng)
    base = len(seq) - 1  # the target's cache held seq[:-1]
    slots.cache.truncate(slot, base + n + 1)
    source.rollback(slot, base + n + 1)
    k.update(len(proposed), n)
    return n, token


def generate(engine, rows: list[list[int]], max_new_tokens: int, source, k: AdaptiveK, sampling: Sampling, pad: int,
             seed: int | None, output_logits: bool, streamer,
             constraints: list | None = None) -> tuple[np.ndarray, np.ndarray | None, Stats]:
    """Speculative generation of each row on its own, in one slot reused row after row (``source`` holds one
    too); returns Engine.generate's left-padded ids (and logits)."""
    rng = np.random.default_rng(seed)
    stats = Stats(source.name)
    width = max(len(r) for r in rows)
    # a round proposes at most the tokens still to come, less one: no step writes past prompt + max_new_tokens
    slots = engine.open_slots(1, width + max_new_tokens)
    outputs, kept_logits = [], []
    for row, prompt in enumerate(rows):
        slots.cache.clear(0)
        source.clear(0)
        chooser = TokenChooser(sampling, prompt, constraints[row] if constraints else None)
        produced, logits_rows = _generate_row(slots, prompt, max_new_tokens, source, k, chooser, rng, stats,
                                              output_logits, streamer)
        outputs.append(produced)
        kept_logits.append(logits_rows)
    longest = max(len(o) for o in outputs)
    ids = np.full((len(rows), width + longest), pad, dtype=np.int64)
    for row, (prompt, produced) in enumerate(zip(rows, outputs)):
        ids[row, width - len(prompt):width] = prompt
        ids[row, width:width + len(produced)] = produced
    logits = None
    if output_logits:
        vocab = engine.vocab
        logits = np.zeros((len(rows), longest, vocab), dtype=np.float32)
        for row, rows_logits in enumerate(kept_logits):
            logits[row, :len(rows_logits)] = rows_logits
    return ids, logits, stats


def _generate_row(slots, prompt, max_new_tokens, source, k, chooser, rng, stats, output_logits,
                  streamer) -> tuple[list[int], list]:
    """One row in slot 0: prefill, then rounds of propose -> verify -> accept -> roll back, until EOS (or a
    complete grammar) or the budget."""
    logits = slots.step(0, 1, np.array([prompt], dtype=np.int64))[0, -1]
    seq, kept = list(prompt), []  # a draft reads the prompt in its first proposal (after the 1st token)
    if output_logits:
        kept.append(logits.copy())
    token = chooser.choose(logits, rng)
    while True:
        if _book(token, chooser, seq, streamer) or chooser.produced >= max_new_tokens:
            break
        proposed, n, token, verify = speculate_round(slots, 0, seq, max_new_tokens - chooser.produced, source, k,
                                                     chooser, rng)
        stats.target_steps += 1
        stats.drafted, stats.accepted = stats.drafted + len(proposed), stats.accepted + n
        ended = next((i for i, t in enumerate(proposed[:n]) if _book(t, chooser, seq, streamer)), None)
        if output_logits:  # the logits each kept token was chosen from (the target's next token's too, unless cut)
            kept.extend(verify[i].copy() for i in range(n + 1 if ended is None else ended + 1))
        if ended is not None:  # an accepted draft token ended the row: the target's next token is moot
            break
    stats.generated += chooser.produced
    return chooser.output[:], kept


def _book(token: int, chooser: TokenChooser, seq: list[int], streamer) -> bool:
    """Keep one output token; True when it ends the row (a stop id, or the grammar is complete)."""
    chooser.accept(token)
    seq.append(token)
    if streamer is not None:
        streamer(np.array([token], dtype=np.int64))
    return bool(chooser.sampling.stop_ids.size and token in chooser.sampling.stop_ids) or chooser.finished
