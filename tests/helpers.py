"""Shared test material: tiny random-weight configs of the named families, saved as real HF directories."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

# Four layers: a Hugging Face directory compiles by the streamed path (compiler/stream/), which exports a
# two-layer template and stamps the rest, so two layers would never exercise the stamp.
LAYERS = 4
COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
)

# The families the foundation issue names, with the variations that stress capture: sliding windows
# (Mistral window 16 < the 52-token generations below), partial rotary (Phi3), qkv bias (Qwen2),
# learned positions and tied embeddings (GPT-2).
NAMED_FAMILIES = {
    "llama": dict(COMMON),
    "mistral": dict(COMMON, sliding_window=16),
    "qwen2": dict(COMMON),
    "phi3": dict(COMMON, partial_rotary_factor=0.5, pad_token_id=0),
    "gpt2": dict(vocab_size=320, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=256, initializer_range=0.1),
}

# Other architectures transformers can load, compiled with no per-family code in luffy.
OTHER_FAMILIES = {
    "qwen3": dict(COMMON, head_dim=16),
    # sliding and full attention alternate: a 4-layer template (both orders of the pair, ending like the model)
    # stamped to 6 layers
    "gemma2": dict(COMMON, head_dim=16, sliding_window=16, num_hidden_layers=6),
    "gpt_neox": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                     num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5, initializer_range=0.1),
    "falcon": dict(vocab_size=320, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                   new_decoder_architecture=True, num_kv_heads=2, initializer_range=0.1),
    "bloom": dict(vocab_size=320, hidden_size=64, n_layer=LAYERS, n_head=4, initializer_range=0.1),
    "opt": dict(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64),
}

PROMPT = [3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39, 41]


def make_hf_dir(family: str, config_kwargs: dict, directory: Path, seed: int = 0):
    """Build a random-weight causal LM, save it with safetensors plus a tokenizer; return the torch model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from luffy.models_zoo.byte_tokenizer import byte_tokenizer

    config = AutoConfig.for_model(family, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(add_bos=False)).save_pretrained(directory)
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int):
    """transformers' own greedy generate: (ids, per-step logits) with EOS stopping disabled."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
            # no EOS at all (as luffy's eos_token_id=None): with one, min_new_tokens masks the EOS logit, and a step
            # whose argmax is EOS would take the runner-up
            eos_token_id=None,
        )
    logits = torch.stack(out.logits, dim=1).numpy()
    return out.sequences.numpy(), logits


def assert_greedy_like_pytorch(engine, model, prompt: list[int] = (1, 17, 33, 5, 90), new_tokens: int = 12):
    """The engine's greedy tokens for ``prompt`` are transformers' own (EOS stopping off on both sides)."""
    expected, _ = hf_greedy(model, list(prompt), new_tokens)
    got = engine.generate([list(prompt)], max_new_tokens=new_tokens, eos_token_id=None)
    assert np.array_equal(got, expected)


def assert_engine_matches_transformers(engine, model, atol: float, new_tokens: int = 32):
    """The contract on PROMPT: every position's logits equal PyTorch's within ``atol``, and greedy generation
    gives transformers' tokens, with each step's logits within ``atol``."""
    assert np.abs(engine.score([PROMPT]) - torch_logits(model, [PROMPT])).max() <= atol
    ids, logits = engine.generate([PROMPT], max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                  output_logits=True)
    ref_ids, ref_logits = hf_greedy(model, PROMPT, new_tokens)
    assert ids.tolist() == ref_ids.tolist()
    assert np.abs(logits - ref_logits).max() <= atol


def torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.float().numpy()


# What `luffy` prints on stderr when it is not a terminal (a pipe, a CI log): one plain line per stage of
# long work, "luffy: <title>: <stage> (<seconds>s)".
_PROGRESS_LINE = re.compile(r"^luffy: (?!error: ).+: .+ \(\d+\.\ds\)$")


def luffy_cli(*args, env: dict | None = None, check: bool = False, timeout: float = 600):
    """`luffy ARGS` in its own process, as a user runs it (this Python's luffy; ``env`` added to the environment);
    ``check``: a non-zero exit fails the test with the command and its stderr."""
    proc = subprocess.run([sys.executable, "-m", "luffy", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"luffy {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr}")
    return proc


def error_line(stderr: str) -> str:
    """The one error line of a failed `luffy` run. Besides it stderr may hold only progress lines, before it:
    no traceback, no warning, no second error."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("luffy: error: "), stderr
    assert all(_PROGRESS_LINE.match(ln) for ln in lines[:-1]), stderr
    return lines[-1]


def compiled_families(tmp_path_factory, families: dict):
    """``get(family) -> (Artifact, torch module)``: each family saved as an HF directory and compiled from disk
    at -O2, once per fixture scope."""
    import luffy

    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            model = make_hf_dir(family, families[family], root / "hf")
            cache[family] = (luffy.compile(str(root / "hf"), output=root / "artifact"), model)
        return cache[family]

    return get


def assert_transformers_generates(model, batch: np.ndarray, rows: list[list[int]], new_tokens: int):
    """transformers, given the same left-padded prompts (pad 0), greedily generates exactly ``batch``."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor(batch[:, :width])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ref.numpy().tolist() == batch.tolist()


def greedy_alone(engine, prompt: list[int], new_tokens: int) -> list[int]:
    """The tokens Engine.generate gives ``prompt`` alone, greedy, no EOS stop: what a scheduled request must equal."""
    return engine.generate([prompt], max_new_tokens=new_tokens, eos_token_id=None)[0, len(prompt):].tolist()
