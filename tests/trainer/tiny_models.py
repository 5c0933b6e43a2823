"""A one-layer GPT and its optimizer for the post-training unit tests (sft, rl)."""

from __future__ import annotations

import torch
from nanorun.trainer.model.gpt import GPT, GPTConfig
from nanorun.trainer.model.optim import MuonAdamW


def tiny_gpt(vocab_size: int, sequence_len: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64
        )
    )
    model.init_weights()
    return model


def tiny_optimizer(model: GPT) -> MuonAdamW:
    return model.setup_optimizer(
        matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.02, scalar_lr=0.1, weight_decay=0.0
    )
