"""A byte-level tokenizer for the zoo models: every UTF-8 byte is one token, plus a few specials.

Built from the `tokenizers` library with an empty merge list, so it needs no training data and no hub,
round-trips any text, and is saved into artifacts as an ordinary tokenizer.json.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
NUM_BYTE_TOKENS = 256


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-character map, which tokenizers' ByteLevel pre-tokenizer uses.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def byte_tokenizer(add_bos: bool) -> Tokenizer:
    """Return the zoo's byte tokenizer; ``add_bos`` prepends ``<bos>`` to every encoded sequence.

    >>> tok = byte_tokenizer(add_bos=False)
    >>> tok.decode(tok.encode("héllo").ids)
    'héllo'
    """
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
        )
    return tok
