"""Chat templates: the artifact's Jinja template rendered as transformers' ``apply_chat_template`` does.

A serving process has no transformers, so the template runs here on jinja2's sandbox with the settings
and helpers transformers gives templates (trim_blocks, lstrip_blocks, loop controls, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text). A template is data from the model directory,
so it gets the immutable sandbox: it can format text, not touch Python objects.

Content is text: only the template places control tokens. A user who writes ``<eos>`` inside a message gets the
characters "<eos>", not the end-of-sequence token (``ChatTokens``).
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import UsageError


class TemplateError(UsageError):
    """The messages could not be rendered (the template raised, or a message is malformed)."""


def _raise(message: str):
    raise TemplateError(f"chat template: {message}")


class ChatTemplate:
    """The artifact's chat template, compiled once.

    >>> ChatTemplate(text, bos_token="<s>", eos_token="</s>").render([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    """

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except Exception as exc:  # noqa: BLE001 - jinja2's TemplateSyntaxError and friends
            raise TemplateError(f"chat template does not compile: {exc}") from None
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self.source = source  # what serving/tools.py reads the model's tool-call format from

    @classmethod
    def from_artifact(cls, path: Path, manifest: dict) -> "ChatTemplate | None":
        chat = manifest.get("chat_template")
        if not chat:
            return None
        source = (path / chat["file"]).read_text()
        return cls(source, chat.get("bos_token"), chat.get("eos_token"))

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                        **self.special)
        except TemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the template does with odd input
            raise TemplateError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from None


class ChatTokens:
    """Token ids of rendered chats in which message content is plain text.

    A tokenizer turns every special-token string it meets into the control token, wherever it came from. So the
    special-token strings inside message content are swapped for unique placeholders before rendering; the
    rendered text is tokenized piece by piece between them as usual (the template's own special tokens become
    control tokens), and each placeholder as the plain text it stands for (a copy of the tokenizer with
    ``encode_special_tokens`` on). A chat without such strings is tokenized exactly as before, in one piece.
    Where the text is split (around the user's string) tokens cannot merge across, which is also where the
    tokenizer would have split at the special token.

    >>> ChatTokens(tokenizer).encode(template, [{"role": "user", "content": "say <eos>"}])   # doctest: +SKIP
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.plain = Tokenizer.from_str(tokenizer.to_str())
        self.plain.encode_special_tokens = True
        specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        self.specials = re.compile("|".join(map(re.escape, specials))) if specials else None

    def encode(self, template: ChatTemplate, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        nonce = uuid.uuid4().hex
        found: list[str] = []

        def hide(match) -> str:
            found.append(match.group(0))
            return f"\ue000{nonce}:{len(found) - 1}\ue001"

        if self.specials is not None:
            messages = [{**m, "content": self.specials.sub(hide, m["content"])} if isinstance(m.get("content"), str)
                        else m for m in messages]
        text = template.render(messages, add_generation_prompt, tools)
        if not found:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)  # text, index, text, index, ..., text
        for i, piece in enumerate(pieces):
            if i % 2:
                ids += self.plain.encode(found[int(piece)], add_special_tokens=False).ids
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False).ids
        return ids
