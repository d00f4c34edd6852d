"""Backend-neutral generation: batching ragged prompts, the decode loop, stopping. No framework, numpy only.

A backend supplies ``step(input_ids, attention_mask, position_ids, past_len) -> logits[:, -1, :]``
that reads and writes its own KV cache; everything else (padding, positions, sampling, EOS) is here so
every backend generates the same tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import CapacityError, UsageError
from .sampling import Constraint, Sampling, TokenChooser, choose_rows


def as_rows(input_ids, vocab: int | None = None) -> list[list[int]]:
    """Normalize a 2-D array or a list of token-id lists (ragged allowed) into python lists; with ``vocab``,
    every id must lie in [0, vocab) (a negative id would silently index from the end of the embedding)."""
    if isinstance(input_ids, np.ndarray) or hasattr(input_ids, "tolist"):
        arr = np.asarray(input_ids.tolist() if not isinstance(input_ids, np.ndarray) else input_ids)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise UsageError(f"input_ids must be 2-D [batch, seq], got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise UsageError(f"input_ids must be integers, got dtype {arr.dtype}")
        rows = arr.tolist()
    elif isinstance(input_ids, Sequence) and input_ids and all(isinstance(t, (int, np.integer)) for t in input_ids):
        rows = [list(input_ids)]
    elif isinstance(input_ids, Sequence):
        rows = [list(r) for r in input_ids]
    else:
        raise UsageError(f"input_ids must be a 2-D array or a list of token-id lists, got {type(input_ids).__name__}")
    if not rows or any(len(r) == 0 for r in rows):
        raise UsageError("input_ids must hold at least one non-empty row")
    for r in rows:
        for t in r:
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
                raise UsageError(f"input_ids must be integers, got {t!r}")
    rows = [[int(t) for t in r] for r in rows]
    if vocab is not None:
        for i, r in enumerate(rows):
            for j, t in enumerate(r):
                if not 0 <= t < vocab:
                    raise UsageError(f"token id {t} (row {i}, position {j}) is outside the vocabulary of size {vocab}")
    return rows


def ids_array(input_ids, vocab: int | None) -> np.ndarray:
    """A rectangular int64 id array (the score-with-mask path), every id in [0, vocab)."""
    try:
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu":
            raise UsageError(f"input_ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
    except (OverflowError, ValueError) as exc:
        raise UsageError(f"input_ids must be a rectangular array of int64 token ids ({exc})") from None
    if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise UsageError(f"token id {bad} is outside the vocabulary of size {vocab}")
    return ids


def left_pad(rows: list[list[int]], pad_id: int, width: int | None = None):
    """Left-pad ragged rows (as transformers does for generation); return ids [B, W] and mask [B, W]."""
    width = width or max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """transformers' rule: position = index among real tokens; padded slots get 1 (their value is unused)."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    return pos.astype(np.int64)


def eos_set(eos_token_id) -> np.ndarray:
    if eos_token_id is None:
        return np.empty(0, dtype=np.int64)
    if isinstance(eos_token_id, (int, np.integer)):
        return np.array([eos_token_id], dtype=np.int64)
    return np.array(list(eos_token_id), dtype=np.int64)


def check_capacity(prompt_len: int, new_tokens: int, limit: int | None, new_name: str = "max_new_tokens",
                   limit_name: str = "the artifact's maximum sequence length") -> None:
    """Refuse, before any work and in one line naming both numbers, a prompt plus ``new_tokens`` beyond ``limit``
    positions (None: no limit). Engine.generate/score, the serving scheduler and `luffy bench` all check here;
    ``new_name`` and ``limit_name`` are what the caller's user calls them.

    >>> check_capacity(60, 10, 64)
    Traceback (most recent call last):
    luffy.errors.CapacityError: prompt length 60 + max_new_tokens 10 = 70 exceeds the artifact's maximum sequence length 64
    """
    if new_tokens < 0:
        raise UsageError(f"{new_name} must be >= 0, got {new_tokens}")
    if limit is not None and prompt_len + new_tokens > limit:
        raise CapacityError(f"prompt length {prompt_len} + {new_name} {new_tokens} = {prompt_len + new_tokens} "
                            f"exceeds {limit_name} {limit}")


def generate_loop(
    step: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ids: np.ndarray,
    mask: np.ndarray,
    max_new_tokens: int,
    sampling: Sampling,
    *,
    pad_token_id: int = 0,
    seed: int | None = None,
    output_logits: bool = False,
    streamer: Callable[[np.ndarray], None] | None = None,
    constraints: Sequence[Constraint | None] | None = None,
):
    """Prefill, then decode one token per step; returns [batch, prompt + generated] like transformers.

    ``step(ids [batch, s], real [batch, s]) -> logits [batch, vocab]`` runs the model on the next tokens
    (``real`` 0 marks left padding) and owns the cache, positions and attention mask. Each row chooses through
    its own TokenChooser (runtimes/sampling.py's chain; the penalties see that row's prompt without padding,
    ``constraints`` gives a row its grammar); ``sampling.stop_ids`` end a row. With ``output_logits`` also
    returns the raw logits each new token was chosen from, [batch, new, vocab] (transformers'
    ``output_logits``). ``streamer(tokens)`` is called with each step's new tokens [batch] as soon as they
    are chosen (the first call marks time to first token).
    """
    batch, prompt_len = ids.shape
    if max_new_tokens == 0:
        return (ids.copy(), np.zeros((batch, 0, 0), np.float32)) if output_logits else ids.copy()
    rng = np.random.default_rng(seed)
    constraints = list(constraints) if constraints is not None else [None] * batch
    choosers = [TokenChooser(sampling, ids[row][mask[row] == 1], constraints[row]) for row in range(batch)]
    stop = frozenset(sampling.stop_ids.tolist())  # a set lookup: np.isin on one token costs tens of µs a step
    out = np.empty((batch, prompt_len + max_new_tokens), dtype=np.int64)
    out[:, :prompt_len] = ids
    finished = np.zeros(batch, dtype=bool)
    kept_logits = []
    every_row = np.ones((batch, 1), dtype=np.int64)

    logits = step(ids, mask)
    length = prompt_len
    for produced in range(max_new_tokens):
        if output_logits:
            kept_logits.append(np.array(logits, dtype=np.float32, copy=True))
        token = choose_rows(choosers, logits, rng, skip=finished).astype(np.int64)
        token[finished] = pad_token_id
        for row in np.flatnonzero(~finished):
            choosers[row].accept(int(token[row]))
            finished[row] |= choosers[row].finished  # a complete grammar ends its row as EOS does
        out[:, length] = token
        if streamer is not None:
            streamer(token)
        if stop:
            finished |= np.fromiter((t in stop for t in token.tolist()), dtype=bool, count=batch)
        length += 1
        if finished.all() or produced == max_new_tokens - 1:
            break
        logits = step(token[:, None], every_row)
    if output_logits:
        return out[:, :length], np.stack(kept_logits, axis=1)
    return out[:, :length]


class PositionTracker:
    """For a backend whose step takes (ids, attention_mask, position_ids, past_len) over a concat cache
    (TensorRT): turns generate_loop's (ids, real) steps into those, keeping the whole mask."""

    def __init__(self, step4: Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]):
        self.step4, self.mask = step4, None

    def __call__(self, ids: np.ndarray, real: np.ndarray) -> np.ndarray:
        past = 0 if self.mask is None else self.mask.shape[1]
        self.mask = real.copy() if self.mask is None else np.concatenate([self.mask, real], axis=1)
        positions = positions_from_mask(self.mask)[:, past:]
        return self.step4(ids, np.ascontiguousarray(self.mask), positions, past)
