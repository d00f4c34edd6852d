"""The model zoo: built-in model definitions that compile without any download.

``ZOO`` is a plain dict literal (no registration at import time); each entry says how to build the
torch module and its tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import tiny, trained
from .byte_tokenizer import byte_tokenizer


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "causal-lm" or "encoder"
    description: str
    build_model: Callable[[], object]
    add_bos: bool
    chat_template: str | None = None  # Jinja, as transformers' apply_chat_template reads it


ZOO: dict[str, ZooEntry] = {
    "llama-tiny": ZooEntry("llama-tiny", "causal-lm", tiny.llama_tiny.__doc__, tiny.llama_tiny, True),
    "gpt2-tiny": ZooEntry("gpt2-tiny", "causal-lm", tiny.gpt2_tiny.__doc__, tiny.gpt2_tiny, False),
    "bert-tiny": ZooEntry("bert-tiny", "encoder", tiny.bert_tiny.__doc__, tiny.bert_tiny, False),
    # Trained weights (not seeded): what quantization quality is measured on.
    "llama-pydoc": ZooEntry("llama-pydoc", "causal-lm", trained.pydoc_llama.__doc__, trained.pydoc_llama, True,
                            trained.PYDOC_CHAT_TEMPLATE),
}


def build_tokenizer(entry: ZooEntry):
    """The `tokenizers.Tokenizer` a zoo entry ships with."""
    return byte_tokenizer(add_bos=entry.add_bos)
