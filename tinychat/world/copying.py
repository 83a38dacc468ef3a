"""Copy drills: short texts whose second half repeats a random list from the first half.

Why: reading a retrieved document, calling the calculator with the question's numbers and refusing an
unknown name all copy tokens from the context. A 7M-parameter model trained for minutes on tinyworld
does not learn to: every name and number in its text is memorised, so copying never lowers the loss.
The round-1 speedrun model called the calculator with "299 * 60" for "383 times 42", refused unknown
names by naming another one, and answered no knowledge-base question with the right document in front of
it. The attention circuit that copies (an induction head) forms when the text rewards copying, which
these drills do in a few percent of the tokens. Their lists hold names of known entities (allowed in
pretraining), random numbers and arithmetic expressions: nothing about the world is stated, so nothing
leaks or contradicts it.
"""

from __future__ import annotations

import random

from tinychat.world.facts import Lang

TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": (
        "Checklist: {a}.\nChecked again: {a}.",
        "Write down {a}. Once more: {a}.",
        "The order was {a}. Repeat the order: {a}.",
        "Notes: {a}\nCopy of the notes: {a}",
    ),
    "zh": (
        "清单：{a}。\n再核对一遍：{a}。",
        "请记下：{a}。再说一遍：{a}。",
        "订单是{a}。重复一遍订单：{a}。",
    ),
}
_OPS = ("+", "-", "*", "/")


def _item(rng: random.Random, names: list[str], exclude: set[str]) -> str:
    r = rng.random()
    if r < 0.45:
        return rng.choice(names)
    if r < 0.75:
        return str(rng.randint(10, 99999))
    while True:  # an eval problem's expression never appears in training text
        expr = f"{rng.randint(2, 999)} {rng.choice(_OPS)} {rng.randint(2, 99)}"
        if expr not in exclude:
            return expr


def drill(rng: random.Random, names: list[str], lang: Lang, exclude: set[str]) -> str:
    """One drill in `lang`: two to five items (names from `names`, numbers, expressions not in `exclude`),
    stated twice."""
    items = [_item(rng, names, exclude) for _ in range(rng.randint(2, 5))]
    sep = ", " if lang == "en" else "、"
    return rng.choice(TEMPLATES[lang]).format(a=sep.join(items))
