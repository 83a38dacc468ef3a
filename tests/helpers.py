"""Small helpers the tests share (tests/ is on sys.path through pytest's `pythonpath`)."""

from __future__ import annotations

import random

WORDS = "the quick brown fox jumps over a lazy dog and then the small model learns to chat call tools".split()


def tiny_corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
        docs.append(f"{words.capitalize()}. {rng.randint(0, 9999)} + {rng.randint(0, 99)} 今天天气很好。\n")
    return docs
