"""/v1/embeddings from an encoder artifact: sentence vectors as sentence-transformers computes them.

all-MiniLM-L6-v2 and its kind are a Transformer, then Pooling (mean of the last hidden state over the tokens the
attention mask keeps), then Normalize (unit length); OpenAI's embeddings are unit vectors too. The server does the
same on the artifact's graph: inputs are tokenized without the tokenizer file's fixed padding and truncation
(a batch is padded to its longest row, and padding never reaches the mean), run in batches of ``BATCH`` rows,
pooled and normalized. An input longer than the artifact's ``max_seq_len`` is refused by index, never cut
(sentence-transformers truncates at its own max_seq_length instead: 256 tokens for all-MiniLM-L6-v2).
"""

from __future__ import annotations

import base64
import threading

import numpy as np
from tokenizers import Tokenizer

from ..errors import UsageError

BATCH = 32  # rows per graph run: bounds the [rows, seq, hidden] activations of a large request
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


class Embedder:
    """Mean-pooled, L2-normalized embeddings of token-id rows on an encoder engine (one request at a time: each
    run already spreads over all of ONNX Runtime's threads).

    >>> Embedder(luffy.load("build/minilm")).embed([[101, 7592, 102]]).shape   # doctest: +SKIP
    (1, 384)
    """

    def __init__(self, engine):
        self.engine = engine
        self.tokenizer = None
        if engine.manifest.get("tokenizer"):
            self.tokenizer = Tokenizer.from_str(engine.tokenizer.to_str())
            self.tokenizer.no_padding()  # padding is per batch here; a fixed length would only cost time
            self.tokenizer.no_truncation()  # an input too long is refused, not silently cut
        outputs = (engine.manifest.get("io") or {}).get("outputs", [])
        hidden = next((o for o in outputs if len(o.get("shape") or []) == 3), None)
        if hidden is None:
            raise UsageError(f"{engine.path}: no [batch, seq, hidden] output to pool (outputs: "
                             f"{[o.get('name') for o in outputs]})")
        self.output, self.dimensions = hidden["name"], hidden["shape"][-1]
        self.max_len = engine.max_seq_len
        pad = (engine.manifest.get("generation") or {}).get("pad_token_id")
        self.pad_id = int(pad[0] if isinstance(pad, list) else pad or 0)
        self.vocab = self.tokenizer.get_vocab_size() if self.tokenizer is not None else None
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise UsageError(f"{self.engine.path}: the artifact has no tokenizer; send token ids")
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def embed(self, rows: list[list[int]]) -> np.ndarray:
        """float32 [len(rows), dimensions], each row of unit length."""
        out = np.empty((len(rows), self.dimensions), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch: less padding
        with self._lock:
            for start in range(0, len(rows), BATCH):
                picked = order[start:start + BATCH]
                out[picked] = self._pooled([rows[i] for i in picked])
        return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)  # Normalize's clamp

    def _pooled(self, rows: list[list[int]]) -> np.ndarray:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.engine.input_types:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.engine.run(feeds)[self.output]
        weights = mask[:, :, None].astype(np.float32)
        return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)  # Pooling(mean)'s clamp


def encoded(vector: np.ndarray, encoding_format: str):
    """One embedding as OpenAI returns it: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
