"""A tiny tokenizer (trained here in milliseconds) and a 2-layer random model for engine tests."""

from __future__ import annotations

import random

import pytest
import torch

from tinychat.model import Model, ModelConfig
from tinychat.tokenizer import Tokenizer, train_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while tiny models learn to chat and call tools in Paris".split()


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    rng = random.Random(0)
    docs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + ' {"city": "Paris", "n": 7}\n'
        for _ in range(300)
    ]
    return train_tokenizer(docs, 600)


@pytest.fixture(scope="session")
def model(tok: Tokenizer) -> Model:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_ff=128, max_seq_len=256
    )
    return Model(cfg).eval()


@pytest.fixture(scope="session")
def prompts(tok: Tokenizer) -> list[list[int]]:
    """16 prompts of 2 to ~60 tokens."""
    rng = random.Random(1)
    return [tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))) for _ in range(16)]
