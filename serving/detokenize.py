"""Incremental detokenization: the text a stream of token ids adds, one step at a time.

Decoding the whole sequence after every token is quadratic, and decoding each token alone breaks
multi-byte characters (a byte-level tokenizer emits one UTF-8 byte per token) and word-joining rules
(SentencePiece's leading space). So, like vLLM's and TGI's detokenizers, this keeps two offsets into the
ids: text is decoded over a short window [prefix, end) and only what lies after the already-emitted
window [prefix, read) is new; text that ends in U+FFFD (an incomplete character) waits for the next id.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed ids one step at a time; ``add`` returns the new text they complete (possibly "").

    >>> d = IncrementalDetokenizer(tokenizer, prompt_ids=[256, 72])    # doctest: +SKIP
    >>> d.add([105]), d.add([0xE2]), d.add([0x82, 0xAC])                # doctest: +SKIP
    ('i', '', '€')
    """

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True, context: int = 5):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        # a few prompt ids give the first generated token its context (a SentencePiece space, a joined word)
        self.ids: list[int] = list(prompt_ids or [])[-context:]
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(int(t) for t in new_ids)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # nothing complete yet: an unfinished character or a token that renders as nothing
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back at the end of generation (an incomplete character as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        delta = after[len(before):] if len(after) > len(before) else ""
        self.prefix = self.read = len(self.ids)
        return delta
