"""Shared fixtures: a tiny tokenizer and a tiny random model directory, built once per test session.

Hermetic by construction: the corpus is written here, the tokenizer trains in milliseconds, the model
is random; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_corpus


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker's torch takes its share of the threads
    torch would use alone: two workers of two threads each on two cores would contend for them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tinychat.tokenizer import train_tokenizer

    return train_tokenizer(tiny_corpus(), 400)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random qwen3-style model (2 layers, d=64) with the tiny tokenizer, saved in HF layout."""
    from tinychat.model import Model, preset

    torch.manual_seed(0)
    cfg = preset(
        "tiny",
        vocab_size=tiny_tokenizer.vocab_size,
        d_model=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        head_dim=16,
        d_ff=128,
        max_seq_len=128,
        eos_token_id=tiny_tokenizer.eos_id,
        pad_token_id=tiny_tokenizer.pad_id,
    )
    d = tmp_path_factory.mktemp("models") / "tiny"
    Model(cfg).save_pretrained(str(d))
    tiny_tokenizer.save_pretrained(d)
    return d
