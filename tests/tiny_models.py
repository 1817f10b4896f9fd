"""Small models the tests build offline (no download): shared by the LoRA, checkpoint and CLI tests."""

from __future__ import annotations


def tiny_llama_config(vocab_size: int = 128):
    """A 2-layer Llama config (hidden 64, 4 heads, 2 KV heads): big enough for q/k/v/o/gate/up/down."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
