"""Fixtures for the data tests: a seeded random generator and a small trained tokenizer directory."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from datagen import en_doc, zh_doc


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600-id byte-level BPE tokenizer trained on generated English and Chinese, saved to disk."""
    from tinychat.tokenizer import train_tokenizer

    r = random.Random(7)
    tok = train_tokenizer([en_doc(r) for _ in range(60)] + [zh_doc(r) for _ in range(60)], 600)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out
