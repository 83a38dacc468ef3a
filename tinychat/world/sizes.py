"""Size presets: how many entities, documents and rows each split gets.

Why these numbers (small, the speedrun default): the cpu-tiny preset pretrains ~7M parameters for 9 minutes,
~2.6M tokens on a 2-core CPU, of which ~60% are the SFT conversations mixed in (docs/speedrun.md) and ~1.1M
the text. Facts are stored only after many exposures (the issue-14 measurements: cloze recall 18% after 5
passes over the text, 70% after 9.5), so the small world's text is mostly the entity documents: arithmetic
drills and fact-free prose were cut from 900 and 700 documents to 300 and 150 (35% and 15% of the tokens,
for no measurable skill). Copy drills (world/copying.py) are off here: at 8% and at 32% of the tokens they
did not teach this model to copy from its context within the budget (docs/speedrun.md).
"small" has 300 known entities (150 trained + 150 held out), 6 documents each per language, each stating
every fact once, so one pass over the text states every fact 6 times per language (plus cross references).
Token counts are estimates (non-CJK UTF-8 bytes / 4 + CJK characters / 1.5); manifest.json records them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Text tokens the cpu-tiny speedrun's pretraining spends (~2.6M tokens in 9 minutes, ~40% of them text).
CPU_TINY_PRETRAIN_TOKENS = 1_100_000


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
    copy_docs: int  # pretraining copy drills (world/copying.py): what teaches the model to copy from its context
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
        copy_docs=10,
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
        arith_docs=300,  # a third of round 1's 900: 35% of the tokens, and the tiny model learned no sums from them
        filler_docs=150,  # prose that states no fact; 700 took 15% of the tokens the facts need (docs/speedrun.md)
        copy_docs=0,  # 1,500 (8% of tokens) and 7,500 (32%) taught no copying in the speedrun's budget
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
        copy_docs=0,
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
