"""Random bf16 checkpoints shaped like the models people deploy, written a shard at a time.

`write_checkpoint("8b", DIR)` makes a Hugging Face directory with Llama-3.1-8B's config (same shapes,
vocabulary, RoPE scaling, untied head), a byte-level tokenizer, and random weights in bf16 safetensors shards of
at most ``SHARD_BYTES`` (or one tensor, if larger), so the 16 GB checkpoint is written within a few GB of
memory. Weights are drawn like a trained model's scale (normal, std 0.02; norms 1.0), seeded per tensor name,
so a checkpoint is the same on every machine.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch  # the checkpoints are what transformers' save_pretrained writes: bf16 torch tensors
from safetensors.torch import save_file

from ..models_zoo.byte_tokenizer import byte_tokenizer

SHARD_BYTES = 2 << 30
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    # Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B: the config.json fields that set shapes and numerics
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
    # four layers (a 2-layer template stamped twice) and a small vocabulary: the docs' example, compiled in seconds
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, vocab_size=512, rope_scaling=None),
}
COMMON = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, max_position_embeddings=131072,
              rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", attention_bias=False, mlp_bias=False,
              bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16", initializer_range=0.02)


def config(shape: str) -> dict:
    return {**COMMON, **SHAPES[shape]}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, in the order transformers' save_pretrained writes a Llama."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _random_bf16(name: str, shape: tuple[int, ...]):
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write_checkpoint(shape: str, directory: Path, say=print) -> Path:
    """Write (or keep, when complete) the random ``shape`` checkpoint in ``directory``."""
    directory = Path(directory)
    cfg = config(shape)
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    shards, current, size = [], [], 0
    for name, dims in shapes.items():
        nbytes = 2 * int(np.prod(dims))
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        say(f"writing {file} ({len(names)} tensors)")
        save_file({n: _random_bf16(n, shapes[n]) for n in names}, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(2 * int(np.prod(d)) for d in shapes.values())
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}, indent=2))
    _write_tokenizer(directory)
    # the index last: its presence marks a complete checkpoint
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory


def _write_tokenizer(directory: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(add_bos=False)).save_pretrained(directory)
