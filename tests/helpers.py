"""Shared test helpers: tiny Llama / BERT models (offline), a matrix seen only through products."""

from __future__ import annotations

import torch


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


def tiny_bert_classifier():
    """A 2-layer BERT sequence classifier (hidden 32, 4 heads, 3 labels) in eval mode, from torch's current
    random state: modules_to_save targets (the classifier head) beside LoRA targets."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


class MatrixOperator:
    """A NumPy matrix seen only through products (lowrank's linear-operator protocol)."""

    def __init__(self, S):
        self.S, self.shape, self.dtype = S, S.shape, torch.float64

    def matmul(self, X):
        return torch.from_numpy(self.S @ X.numpy())

    def rmatmul(self, Y):
        return torch.from_numpy(self.S.T @ Y.numpy())
