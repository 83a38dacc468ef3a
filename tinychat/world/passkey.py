"""Passkey documents: a five-digit key hidden at some depth in filler prose, asked for at the end.

Why this task (Mohtashami & Jaggi 2023, "Landmark Attention"): it isolates one ability of a long
context, finding a token sequence seen thousands of tokens earlier, from everything else a model may or
may not know. The filler is tinyworld's prose (tinychat.world.filler: no entities, no facts), so the
documents neither leak nor contradict the world; the key is random, so it can only be copied, never
recalled from training. A tiny model that has never seen the format cannot answer it at any length, so
the training rows (`tinychat world passkey`) teach the format; the evaluation (tinychat.eval.passkey)
then measures at which lengths retrieval still works.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.world import filler

INTRO = "There is an important number hidden inside a lot of irrelevant text. Find it and remember it."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def new_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def prompt(sentences: list[str], key: str, depth: float) -> str:
    """The document up to the question: the needle after round(depth * len(sentences)) filler sentences."""
    at = round(depth * len(sentences))
    parts = [INTRO, *sentences[:at], NEEDLE.format(key=key), *sentences[at:], QUESTION]
    return " ".join(parts)


def document(rng: random.Random, n_sentences: int) -> str:
    """One training document: a prompt with a random key and depth, answered (" KEY.")."""
    key = new_key(rng)
    sentences = [filler.sentence("en", rng) for _ in range(n_sentences)]
    return f"{prompt(sentences, key, rng.random())} {key}."


@dataclass
class PasskeyDataConfig:
    out: str = field("", help="JSONL file of {'text'} rows to write (then `tinychat data tokenize` it)")
    docs: int = field(2000, help="documents to write")
    min_sentences: int = field(4, help="fewest filler sentences per document (about 11 tokens each)")
    max_sentences: int = field(20, help="most filler sentences per document")
    seed: int = field(0)


def run(cfg: PasskeyDataConfig) -> int:
    if not cfg.out:
        raise UserError("--out FILE is required.")
    if cfg.docs < 1 or not 0 <= cfg.min_sentences <= cfg.max_sentences:
        raise UserError("--docs must be positive and 0 <= --min-sentences <= --max-sentences.")
    rng = random.Random(cfg.seed)
    rows = [document(rng, rng.randint(cfg.min_sentences, cfg.max_sentences)) for _ in range(cfg.docs)]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out}: {len(rows)} passkey documents, {cfg.min_sentences}-{cfg.max_sentences} filler sentences")
    return 0
