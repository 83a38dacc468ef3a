"""Text generators for the data tests and whose output passes prepare's default filters.

The generators draw words at random (English: real words with function words mixed in at a natural
rate; Chinese: common characters in punctuated clauses), so documents are distinct, have no repeated
n-grams to speak of, and identify as en / zh; that lets the tests predict exactly which documents a
pipeline run keeps.
"""

from __future__ import annotations

import random

_EN_FUNCTION = (
    "the of and to in that for with as it was on by this are from at or have they which were their has "
    "been would there what will when who more can not but his her she he we had its into than them"
)
_EN_CONTENT = (
    "river teacher garden engine village doctor market library bridge farmer window mountain painter "
    "harbor student kitchen forest captain museum letter castle pilot station island quietly brightly "
    "ancient modern careful hungry distant gentle curious brave silent narrow wooden golden frozen patient "
    "clever humble rapid steady visited repaired described painted followed crossed studied opened carried "
    "watched protected measured improved discovered morning winter evening summer afternoon spring autumn "
    "history science music weather language country history culture machine network theory practice "
    "problem solution region company product service family friend government system program question "
    "number point world school state story result change movement research education development"
)
EN_FUNCTION, EN_CONTENT = _EN_FUNCTION.split(), _EN_CONTENT.split()
ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所"
    "民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日"
    "那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想"
)


def en_doc(rng: random.Random, n_sentences: int = 12) -> str:
    sents = []
    for _ in range(n_sentences):
        words = [
            rng.choice(EN_FUNCTION) if rng.random() < 0.4 else rng.choice(EN_CONTENT) for _ in range(rng.randint(8, 16))
        ]
        sents.append(" ".join(words).capitalize() + rng.choice(".!?."))
    paras = [" ".join(sents[i : i + 4]) for i in range(0, len(sents), 4)]
    return "\n\n".join(paras)


def zh_doc(rng: random.Random, n_sentences: int = 10) -> str:
    sents = []
    for _ in range(n_sentences):
        clauses = ["".join(rng.choice(ZH_CHARS) for _ in range(rng.randint(5, 10))) for _ in range(rng.randint(2, 3))]
        sents.append("，".join(clauses) + rng.choice("。！？"))
    return "".join(sents)


def mutate_words(text: str, rng: random.Random, n: int) -> str:
    """The same document with n words replaced: a near duplicate."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = "zebra"
    return " ".join(words)


def mutate_chars(text: str, rng: random.Random, n: int) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), n):
        chars[i] = "龙"
    return "".join(chars)


def make_cn_id(first17: str) -> str:
    """A Chinese resident ID with a valid ISO 7064 MOD 11-2 check character."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return first17 + "10X98765432"[sum(int(c) * w for c, w in zip(first17, weights)) % 11]
