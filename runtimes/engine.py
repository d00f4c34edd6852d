"""The Engine interface every backend implements, and the parts they share (tokenizer, text I/O)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import ArtifactError, UsageError, first_line
from .generation import as_rows, check_capacity, eos_set, ids_array, left_pad
from .grammar import GrammarCompiler, GrammarSpec
from .sampling import Sampling

STRUCTURED = ("json_schema", "regex", "grammar", "choice")  # Engine.generate's structured-output arguments


class Engine:
    """A loaded artifact. Backends implement ``generate``, ``score`` and ``run``.

    >>> engine = luffy.load("build/llama-tiny")                     # doctest: +SKIP
    >>> engine.generate([[256, 72, 105]], max_new_tokens=8).shape    # doctest: +SKIP
    (1, 11)
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._tokenizer = None
        self._grammars = None
        self._grammars_refused: str | None = None  # why llguidance cannot serve this tokenizer (asked once)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def max_seq_len(self) -> int | None:
        return self.manifest.get("max_seq_len")

    @property
    def tokenizer(self):
        """The artifact's `tokenizers.Tokenizer`; UsageError when it was compiled without one."""
        if self._tokenizer is None:
            name = self.manifest.get("tokenizer")
            if not name:
                raise UsageError(f"{self.path}: artifact has no tokenizer; pass token ids instead of text")
            try:
                self._tokenizer = Tokenizer.from_file(str(self.path / name))
            except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
                reason = first_line(exc)
                raise ArtifactError(f"{self.path / name}: the tokenizers library cannot read it ({reason})") from None
        return self._tokenizer

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles and caches this artifact's structured-output grammars (llguidance on its tokenizer.json)."""
        if self._grammars_refused is not None:
            raise UsageError(self._grammars_refused)
        if self._grammars is None:
            name = self.manifest.get("tokenizer")
            if not name or self.vocab is None:
                raise UsageError(f"{self.path}: structured outputs need the artifact's tokenizer and vocabulary size")
            try:
                self._grammars = GrammarCompiler((self.path / name).read_text(), self.vocab,
                                                 eos_set(self._generation_default("eos_token_id")).tolist(),
                                                 source=str(self.path / name))
            except UsageError as exc:  # remembered: every later constrained request is refused with it at once
                self._grammars_refused = str(exc)
                raise
        return self._grammars

    def _row_constraints(self, constraint, rows: int, max_new_tokens: int, structured: dict) -> list | None:
        """generate's grammars, one per row (or None): the ``constraint`` objects given, or those compiled from
        ``json_schema`` / ``regex`` / ``grammar`` / ``choice`` (at most one of them; JSON compact, as ``strict``)."""
        given = {k: v for k, v in structured.items() if v is not None}
        if not given:
            return row_constraints(constraint, rows)
        if len(given) > 1 or constraint is not None:
            named = [*given, *(["constraint"] if constraint is not None else [])]
            raise UsageError(f"give one of {', '.join(STRUCTURED)} or constraint; got {', '.join(named)}")
        (kind, spec), = given.items()
        return self.grammars.constraints(GrammarSpec(kind, spec, strict=True), rows, max_new_tokens)

    def _generation_default(self, key: str):
        return self.manifest.get("generation", {}).get(key)

    @property
    def vocab(self) -> int | None:
        """The logits' last dimension, as the manifest's I/O signature records it."""
        out = next((o for o in (self.manifest.get("io") or {}).get("outputs", []) if o.get("name") == "logits"), None)
        dim = (out or {}).get("shape", [None])[-1] if out and out.get("shape") else None
        return dim if isinstance(dim, int) else None

    # -- the preamble every backend's generate / score shares ------------------------------------------
    def _require_decoder(self, what: str) -> None:
        if self.kind != "causal-lm":
            raise UsageError(f"{self.path}: {what} needs a causal-LM artifact; this one is {self.kind!r}, use run()")

    def _pad_id(self, pad_token_id) -> int:
        """The id left padding uses: the argument, else the model's pad, else its first EOS, else 0."""
        if pad_token_id is None:
            pad_token_id = _first(self._generation_default("pad_token_id"))  # a manifest may list ids (schema)
        if pad_token_id is not None:
            return int(pad_token_id)
        eos = _first(self._generation_default("eos_token_id"))
        return int(eos) if eos is not None else 0

    def _generate_inputs(self, input_ids, max_new_tokens: int, eos_token_id, pad_token_id):
        """(rows, eos_token_id, pad id) after every check generate makes before any work."""
        self._require_decoder("generate")
        rows = as_rows(input_ids, self.vocab)
        check_capacity(max(len(r) for r in rows), max_new_tokens, self.max_seq_len)
        if eos_token_id == "model":
            eos_token_id = self._generation_default("eos_token_id")
        return rows, eos_token_id, self._pad_id(pad_token_id)

    def _sampling(self, eos_token_id, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                  presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logit_bias: dict | None = None):
        """The logits chain's parameters from generate's arguments (runtimes/sampling.py), checked; the EOS ids
        (already resolved from "model") stop a row and are what min_new_tokens masks."""
        if min_new_tokens < 0:
            raise UsageError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
        bias = {int(token): float(value) for token, value in (logit_bias or {}).items()}
        return Sampling(do_sample, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                        frequency_penalty, bias, eos_set(eos_token_id), min_new_tokens).check(self.vocab)

    def _score_inputs(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) [batch, seq] for score: ragged rows left-padded, or the caller's ids and mask checked."""
        self._require_decoder("score")
        if attention_mask is None:
            ids, mask = left_pad(as_rows(input_ids, self.vocab), self._pad_id(None))
        else:
            ids = ids_array(input_ids, self.vocab)
            mask = np.asarray(attention_mask, dtype=np.int64)
            if ids.ndim != 2 or ids.shape != mask.shape:
                raise UsageError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be equal 2-D shapes")
        check_capacity(ids.shape[1], 0, self.max_seq_len)
        return ids, mask

    def generate_text(self, prompt: str | list[str], max_new_tokens: int = 32, **kwargs) -> str | list[str]:
        """Tokenize, generate and decode; returns only the new text, one string per prompt.

        >>> engine.generate_text("Once upon a time", max_new_tokens=20)   # doctest: +SKIP
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = [enc.ids for enc in self.tokenizer.encode_batch(prompts)]
        out = self.generate(rows, max_new_tokens=max_new_tokens, **kwargs)
        width = max(len(r) for r in rows)
        texts = [self.tokenizer.decode([int(t) for t in row[width:]], skip_special_tokens=True) for row in out]
        return texts[0] if isinstance(prompt, str) else texts

    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, input_ids, attention_mask=None) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, feeds: dict) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


def row_constraints(constraint, rows: int) -> list | None:
    """generate's ``constraint``: None, one Constraint (one row), or a list with one (or None) per row."""
    if constraint is None:
        return None
    if isinstance(constraint, (list, tuple)):
        if len(constraint) != rows:
            raise UsageError(f"constraint: {len(constraint)} constraints for {rows} rows; give one per row")
        return list(constraint)
    if rows != 1:
        raise UsageError(f"constraint: one constraint for {rows} rows; a grammar's state is per row, give a list")
    return [constraint]


def _first(ids):
    """A manifest's token-id field (an id, a list of ids, or null) as one id or None."""
    if isinstance(ids, list):
        return ids[0] if ids else None
    return ids
