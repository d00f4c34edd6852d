"""logprobs in OpenAI's two shapes: the legacy completions object and chat's ``content`` list.

The numbers are the scheduler's (serving/requests.py ``TokenLogprob``: the log-softmax of the model's raw
logits, before the logits chain). Here they get their token strings: a token that decodes to whole characters
is shown as that text; one that is part of a UTF-8 character (a byte-level vocabulary splits them) is shown as
OpenAI shows it, ``bytes:\\xe2\\x82``, and chat's ``bytes`` field carries its raw bytes either way.
"""

from __future__ import annotations

import codecs
import functools
import json

from .requests import TokenLogprob

FLOOR = -9999.0  # JSON has no -inf: a logprob below this is reported as this (vLLM's convention)


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-to-printable-character map, inverted: how ByteLevel vocabularies spell raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenText:
    """Each token's display string and raw bytes, from the artifact's tokenizer (cached per id).

    >>> TokenText(tokenizer).text(0xE2)   # doctest: +SKIP
    'bytes:\\\\xe2'
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = (json.loads(tokenizer.to_str()).get("decoder") or {}) if tokenizer is not None else {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        self.byte_level = _byte_level_table() if "ByteLevel" in kinds else None
        self.special = set(tokenizer.get_added_tokens_decoder()) if tokenizer is not None else set()

    @functools.lru_cache(maxsize=65536)
    def bytes(self, token: int) -> bytes:
        """The token's raw bytes: a byte-level piece mapped back, a ``<0xHH>`` byte-fallback piece, else the
        UTF-8 of its decoded text."""
        if self.tokenizer is None:
            return str(token).encode()
        piece = self.tokenizer.id_to_token(token) or ""
        if token not in self.special:
            if self.byte_level is not None and piece and all(c in self.byte_level for c in piece):
                return bytes(self.byte_level[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
        return self.tokenizer.decode([token], skip_special_tokens=False).encode()

    @functools.lru_cache(maxsize=65536)
    def text(self, token: int) -> str:
        raw = self.bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


class TextOffsets:
    """Where each token starts in a choice's text, counted in characters as tokens arrive: a token that ends in
    part of a character adds nothing until the character completes; special tokens are not in the text."""

    def __init__(self, strings: TokenText, start: int = 0):
        self.strings, self.offset = strings, start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token: int) -> int:
        """The offset ``token`` starts at; moves past it."""
        at = self.offset
        if token not in self.strings.special:
            self.offset += len(self.decoder.decode(self.strings.bytes(token)))
        return at


def completion_logprobs(strings: TokenText, tokens: list[int], entries: list[TokenLogprob | None],
                        offsets: TextOffsets) -> dict:
    """The completions object: ``tokens``, ``token_logprobs``, ``top_logprobs`` (the chosen token and the top
    alternatives, {text: logprob}) and ``text_offset`` (where each token starts in the choice's text, from
    ``offsets``, which moves on) for ``tokens``; an entry of None (the first prompt token, which nothing
    predicts) reports null."""
    body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries):
        text = strings.text(token)
        body["tokens"].append(text)
        body["text_offset"].append(offsets.advance(token))
        if entry is None:
            body["token_logprobs"].append(None)
            body["top_logprobs"].append(None)
            continue
        body["token_logprobs"].append(_value(entry.logprob))
        top = {strings.text(t): _value(lp) for t, lp in entry.top}
        top.setdefault(text, _value(entry.logprob))  # as vLLM: the chosen token is always there
        body["top_logprobs"].append(top)
    return body


def chat_logprobs(strings: TokenText, entries: list[TokenLogprob]) -> dict:
    """Chat's object: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""

    def one(token: int, logprob: float) -> dict:
        return {"token": strings.text(token), "logprob": _value(logprob), "bytes": list(strings.bytes(token))}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}

