"""Size presets: how many entities, documents and rows each split gets.

Why these numbers (small, the speedrun default): the cpu-tiny preset trains ~6M parameters for ~8 minutes,
about 4.5M tokens (DESIGN.md). A calibration run learned 400 invented people from 6 paraphrased bios each.
"small" has 300 known entities (150 trained + 150 held out); its pretraining text is ~0.35M estimated tokens
(0.27M with an 8k byte-level BPE trained on it), so the budget passes over every fact 12-16 times, and each
pass states every fact 6 times per language (plus cross references from related entities' documents).
Token counts are estimates (non-CJK UTF-8 bytes / 4 + CJK characters / 1.5); manifest.json records them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Pretraining tokens the cpu-tiny speedrun spends (DESIGN.md: ~5M tokens fit in 8 minutes at the tiny size).
CPU_TINY_PRETRAIN_TOKENS = 4_500_000


@dataclass(frozen=True)
class Size:
    """Counts for one preset. Entity triples are (people, cities, companies)."""

    countries: int
    known: tuple[int, int, int]  # per half: "trained" and "heldout" each get this many
    kb: tuple[int, int, int]
    ragtrain: tuple[int, int, int]
    fakes_train: int
    fakes_eval: int
    docs_per_lang: int  # pretraining documents per known entity per language
    arith_docs: int  # pretraining documents of arithmetic text
    filler_docs: int  # pretraining documents of general prose
    pretrain_val_frac: float
    # post-training rows
    qa_per_fact: int  # SFT questions per (trained entity, fact, language)
    tell_me: int
    arith_direct: int
    arith_tool: int
    multistep: int  # problems; each gives a step-by-step and a direct row
    multiturn: int
    instruction: int
    refusal: int
    rag: int
    agent: int
    chitchat: int
    preference: int
    rl: int
    post_val_frac: float
    # evaluation rows per skill (upper bound; small worlds may have fewer candidates)
    eval_n: int


SIZES: dict[str, Size] = {
    "micro": Size(
        countries=4,
        known=(8, 4, 4),
        kb=(4, 2, 2),
        ragtrain=(4, 2, 2),
        fakes_train=8,
        fakes_eval=6,
        docs_per_lang=2,
        arith_docs=10,
        filler_docs=10,
        pretrain_val_frac=0.1,
        qa_per_fact=1,
        tell_me=4,
        arith_direct=20,
        arith_tool=10,
        multistep=10,
        multiturn=8,
        instruction=12,
        refusal=8,
        rag=8,
        agent=4,
        chitchat=4,
        preference=30,
        rl=30,
        post_val_frac=0.1,
        eval_n=12,
    ),
    "small": Size(
        countries=10,
        known=(110, 20, 20),
        kb=(20, 6, 8),
        ragtrain=(40, 10, 10),
        fakes_train=80,
        fakes_eval=40,
        docs_per_lang=6,
        arith_docs=900,
        filler_docs=700,
        pretrain_val_frac=0.04,
        qa_per_fact=2,
        tell_me=200,
        arith_direct=600,
        arith_tool=400,
        multistep=400,
        multiturn=400,
        instruction=600,
        refusal=300,
        rag=800,  # reading documents competes with "I don't know" for unseen names: it needs the examples
        agent=400,
        chitchat=60,
        preference=2000,
        rl=1500,
        post_val_frac=0.04,
        eval_n=300,
    ),
    "medium": Size(
        countries=24,
        known=(800, 100, 150),
        kb=(60, 15, 20),
        ragtrain=(150, 30, 40),
        fakes_train=400,
        fakes_eval=150,
        docs_per_lang=6,
        arith_docs=4000,
        filler_docs=3000,
        pretrain_val_frac=0.02,
        qa_per_fact=2,
        tell_me=1000,
        arith_direct=4000,
        arith_tool=2500,
        multistep=3000,
        multiturn=2500,
        instruction=4000,
        refusal=2000,
        rag=2500,
        agent=800,
        chitchat=200,
        preference=12000,
        rl=10000,
        post_val_frac=0.02,
        eval_n=1000,
    ),
}
