"""Hugging Face directories the peers read: the suite's reference model and zoo models saved to disk.

Both are deterministic (seeded init), saved with safetensors plus the zoo's byte tokenizer, so every
system in a bench reads the same weights from the same local directory. Needs torch + transformers; the
bench runs these in a worker process so the parent stays light.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models_zoo import ZOO, build_tokenizer
from ..models_zoo.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, byte_tokenizer

# The reference model of the benchmark table: random-weight Llama, ~156M parameters.
REFERENCE_LLAMA = dict(
    hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, intermediate_size=2816,
    vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
)
_STAMP = "luffy-bench-model.json"  # what a directory was built from; a matching one is reused


def _save(model, tokenizer, out: Path, stamp: dict) -> dict:
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / _STAMP).write_text(json.dumps({**stamp, "parameters": params}, indent=2) + "\n")
    return {"path": str(out), "parameters": params, "reused": False}


def _reusable(out: Path, stamp: dict) -> dict | None:
    try:
        saved = json.loads((out / _STAMP).read_text())
    except (OSError, ValueError):
        return None
    if {k: v for k, v in saved.items() if k != "parameters"} == stamp and (out / "config.json").is_file():
        return {"path": str(out), "parameters": saved.get("parameters"), "reused": True}
    return None


def reference_llama(out: str, seed: int = 0, **overrides) -> dict:
    """Save the seeded random-weight Llama (REFERENCE_LLAMA, with ``overrides``) to ``out``; reuse a match."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {**REFERENCE_LLAMA, **overrides}
    stamp = {"model": "reference-llama", "seed": seed, "config": settings}
    out = Path(out)
    if (found := _reusable(out, stamp)) is not None:
        return found
    config = LlamaConfig(**settings, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    return _save(model, byte_tokenizer(add_bos=True), out, stamp)


def zoo_hf_dir(name: str, out: str) -> dict:
    """Save a zoo model (bit-identical to what `luffy compile NAME` captures) as a Hugging Face directory."""
    entry = ZOO[name]
    stamp = {"model": f"zoo:{name}"}
    out = Path(out)
    if (found := _reusable(out, stamp)) is not None:
        return found
    return _save(entry.build_model(), build_tokenizer(entry), out, stamp)
