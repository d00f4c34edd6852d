"""The Engine interface every backend implements, and the parts they share (tokenizer, text I/O)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ArtifactError, UsageError


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
            from tokenizers import Tokenizer

            try:
                self._tokenizer = Tokenizer.from_file(str(self.path / name))
            except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ArtifactError(f"{self.path / name}: the tokenizers library cannot read it ({reason})") from None
        return self._tokenizer

    def _generation_default(self, key: str):
        return self.manifest.get("generation", {}).get(key)

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
