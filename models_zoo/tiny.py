"""Built-in tiny models with seeded random weights: fast enough to compile in seconds, big enough to
exercise every part of the graph (GQA, rotary, learned positions, encoders).

Weights come from a fixed seed, so two machines build bit-identical models and tests are reproducible.
"""

from __future__ import annotations

from .byte_tokenizer import BOS_ID, EOS_ID, PAD_ID

VOCAB = 320  # 256 byte tokens + specials, padded to a multiple of 64
MAX_POSITIONS = 512


def _seeded(config, model_cls_name: str, seed: int):
    import torch
    import transformers

    model_cls = getattr(transformers, model_cls_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def llama_tiny():
    """Llama with grouped-query attention: 2 layers, hidden 64, 4 query heads sharing 2 KV heads."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.1, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    return _seeded(config, "LlamaForCausalLM", seed=1)


def gpt2_tiny():
    """GPT-2 with learned positions and tied embeddings: 2 layers, hidden 64, 4 heads."""
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
        initializer_range=0.1, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    return _seeded(config, "GPT2LMHeadModel", seed=2)


def bert_tiny():
    """BERT encoder: 2 layers, hidden 64, 4 heads; compiled as a plain graph (no KV cache)."""
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD_ID,
    )
    return _seeded(config, "BertModel", seed=3)
