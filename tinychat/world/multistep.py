"""Word problems that need two or three facts and sometimes a subtraction or sum.

Why: they test composition, the step that single-fact questions never exercise. Each problem has a
step-by-step solution (each step states one fact, then the arithmetic by columns as arith.worked writes it,
then "Answer: X") and the same problem is also asked for a direct answer, so an evaluation can compare the
two modes on identical items. A direct answer is trained with the same steps in a <think> block before it,
as a reasoning model answers (round 31): the reply the user reads is the answer alone.
A problem is identified by (kind, entity ids); evaluation problems are excluded from training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tinychat.world import arith
from tinychat.world.facts import Lang, World
from tinychat.world.render import LANG

NUMERIC_KINDS = ("founder_age", "birth_gap", "turn_age", "pop_sum", "founded_gap")
KINDS = NUMERIC_KINDS + ("pop_compare", "birth_country", "employer_founded", "employer_hq")


@dataclass
class Problem:
    kind: str
    ids: tuple[str, ...]
    question: dict[str, str]
    steps: dict[str, list[str]]
    answer: dict[str, str]
    aliases: dict[str, list[str]] = field(default_factory=dict)
    expr: str = ""  # the numeric kinds' arithmetic, calculator-ready: "1983 - 1942"
    numeric: bool = True

    @property
    def key(self) -> tuple[str, ...]:
        return (self.kind, *self.ids)

    def reasoning(self, lang: Lang) -> str:
        """The solution's steps without the answer: the <think> block before a direct answer (round 31)."""
        return LANG[lang].STEP_JOIN.join(self.steps[lang])

    def cot(self, lang: Lang, answer: str | None = None) -> str:
        """The step-by-step solution; `answer`: another answer after the same steps (DPO's rejected reply)."""
        final = self.answer[lang] if answer is None else answer
        return self.reasoning(lang) + "\n" + LANG[lang].ANSWER_PREFIX + final


def make(world: World, kind: str, rng: random.Random, group: str) -> Problem | None:
    """One random problem of `kind` over entities of `group`, or None when the draw does not fit."""
    people, cities, cos = (world.group(group, k) for k in ("person", "city", "company"))
    v = world.value
    if kind == "founder_age":
        c = rng.choice(cos)
        p = world.target(c, "founder")
        by, fy = p.facts["birth_year"], c.facts["founded"]
        a = str(fy - by)
        return Problem(
            kind,
            (c.id,),
            {
                "en": f"How old was the founder of {c.name['en']} when {c.name['en']} was founded?",
                "zh": f"{c.name['zh']}成立时，它的创始人多少岁？",
            },
            {
                "en": [
                    f"The founder of {c.name['en']} is {p.name['en']}.",
                    f"{p.name['en']} was born in {by}.",
                    f"{c.name['en']} was founded in {fy}.",
                    *arith.worked(fy, "-", by, "en", lead=True),
                ],
                "zh": [
                    f"{c.name['zh']}的创始人是{p.name['zh']}。",
                    f"{p.name['zh']}出生于{by}年。",
                    f"{c.name['zh']}成立于{fy}年。",
                    *arith.worked(fy, "-", by, "zh", lead=True),
                ],
            },
            {"en": a, "zh": a},
            expr=f"{fy} - {by}",
        )
    if kind == "birth_gap":
        p1, p2 = rng.sample(people, 2)
        y1, y2 = p1.facts["birth_year"], p2.facts["birth_year"]
        if y1 == y2:
            return None
        if y1 > y2:
            p1, p2, y1, y2 = p2, p1, y2, y1
        a = str(y2 - y1)
        return Problem(
            kind,
            (p1.id, p2.id),
            {
                "en": f"How many years older is {p1.name['en']} than {p2.name['en']}?",
                "zh": f"{p1.name['zh']}比{p2.name['zh']}大几岁？",
            },
            {
                "en": [
                    f"{p1.name['en']} was born in {y1}.",
                    f"{p2.name['en']} was born in {y2}.",
                    *arith.worked(y2, "-", y1, "en", lead=True),
                ],
                "zh": [
                    f"{p1.name['zh']}出生于{y1}年。",
                    f"{p2.name['zh']}出生于{y2}年。",
                    *arith.worked(y2, "-", y1, "zh", lead=True),
                ],
            },
            {"en": a, "zh": a},
            expr=f"{y2} - {y1}",
        )
    if kind == "turn_age":
        p, k = rng.choice(people), rng.choice((18, 20, 30, 40, 50, 60))
        y = p.facts["birth_year"]
        a = str(y + k)
        return Problem(
            kind,
            (p.id, str(k)),
            {"en": f"In which year did {p.name['en']} turn {k}?", "zh": f"{p.name['zh']}在哪一年满{k}岁？"},
            {
                "en": [f"{p.name['en']} was born in {y}.", *arith.worked(y, "+", k, "en", lead=True)],
                "zh": [f"{p.name['zh']}出生于{y}年。", *arith.worked(y, "+", k, "zh", lead=True)],
            },
            {"en": a, "zh": a},
            expr=f"{y} + {k}",
        )
    if kind == "pop_sum":
        c1, c2 = rng.sample(cities, 2)
        x1, x2 = c1.facts["population"], c2.facts["population"]
        a = str(x1 + x2)
        return Problem(
            kind,
            (c1.id, c2.id),
            {
                "en": f"What is the combined population of {c1.name['en']} and {c2.name['en']}?",
                "zh": f"{c1.name['zh']}和{c2.name['zh']}的人口加起来是多少？",
            },
            {
                "en": [
                    f"The population of {c1.name['en']} is {x1}.",
                    f"The population of {c2.name['en']} is {x2}.",
                    *arith.worked(x1, "+", x2, "en", lead=True),
                ],
                "zh": [
                    f"{c1.name['zh']}的人口为{x1}。",
                    f"{c2.name['zh']}的人口为{x2}。",
                    *arith.worked(x1, "+", x2, "zh", lead=True),
                ],
            },
            {"en": a, "zh": a},
            expr=f"{x1} + {x2}",
        )
    if kind == "founded_gap":
        c1, c2 = rng.sample(cos, 2)
        y1, y2 = c1.facts["founded"], c2.facts["founded"]
        if y1 == y2:
            return None
        if y1 > y2:
            c1, c2, y1, y2 = c2, c1, y2, y1
        a = str(y2 - y1)
        return Problem(
            kind,
            (c1.id, c2.id),
            {
                "en": f"How many years after {c1.name['en']} was {c2.name['en']} founded?",
                "zh": f"{c2.name['zh']}比{c1.name['zh']}晚成立多少年？",
            },
            {
                "en": [
                    f"{c1.name['en']} was founded in {y1}.",
                    f"{c2.name['en']} was founded in {y2}.",
                    *arith.worked(y2, "-", y1, "en", lead=True),
                ],
                "zh": [
                    f"{c1.name['zh']}成立于{y1}年。",
                    f"{c2.name['zh']}成立于{y2}年。",
                    *arith.worked(y2, "-", y1, "zh", lead=True),
                ],
            },
            {"en": a, "zh": a},
            expr=f"{y2} - {y1}",
        )
    if kind == "pop_compare":
        c1, c2 = rng.sample(cities, 2)
        x1, x2 = c1.facts["population"], c2.facts["population"]
        if x1 == x2:
            return None
        big, small = (c1, c2) if x1 > x2 else (c2, c1)
        xb, xs = max(x1, x2), min(x1, x2)
        return Problem(
            kind,
            (c1.id, c2.id),
            {
                "en": f"Which city has more people, {c1.name['en']} or {c2.name['en']}?",
                "zh": f"{c1.name['zh']}和{c2.name['zh']}哪座城市人口更多？",
            },
            {
                "en": [
                    f"The population of {c1.name['en']} is {x1}.",
                    f"The population of {c2.name['en']} is {x2}.",
                    f"{xb} is larger than {xs}, so {big.name['en']} has more people.",
                ],
                "zh": [
                    f"{c1.name['zh']}的人口为{x1}。",
                    f"{c2.name['zh']}的人口为{x2}。",
                    f"{xb}大于{xs}，所以{big.name['zh']}的人口更多。",
                ],
            },
            dict(big.name),
            {"en": [big.name["zh"]], "zh": [big.name["en"]]},
            numeric=False,
        )
    if kind == "birth_country":
        p = rng.choice(people)
        c = world.target(p, "birth_city")
        return Problem(
            kind,
            (p.id,),
            {"en": f"In which country was {p.name['en']} born?", "zh": f"{p.name['zh']}出生在哪个国家？"},
            {
                "en": [  # "the city of": "was born in" alone is how the birth-year steps start
                    f"{p.name['en']} was born in the city of {c.name['en']}.",
                    f"{c.name['en']} is in {v(c, 'country', 'en')}.",
                ],
                "zh": [f"{p.name['zh']}出生在{c.name['zh']}。", f"{c.name['zh']}位于{v(c, 'country', 'zh')}。"],
            },
            {lg: v(c, "country", lg) for lg in ("en", "zh")},
            {"en": [v(c, "country", "zh")], "zh": [v(c, "country", "en")]},
            numeric=False,
        )
    if kind == "employer_founded":
        p = rng.choice(people)
        c = world.target(p, "employer")
        y = c.facts["founded"]
        return Problem(
            kind,
            (p.id,),
            {
                "en": f"In what year was the company that {p.name['en']} works for founded?",
                "zh": f"{p.name['zh']}工作的公司是哪一年成立的？",
            },
            {
                "en": [f"{p.name['en']} works for {c.name['en']}.", f"{c.name['en']} was founded in {y}."],
                "zh": [f"{p.name['zh']}在{c.name['zh']}工作。", f"{c.name['zh']}成立于{y}年。"],
            },
            {"en": str(y), "zh": str(y)},
            {"en": [f"{y}年"], "zh": [f"{y}年"]},
        )
    if kind == "employer_hq":
        p = rng.choice(people)
        c = world.target(p, "employer")
        h = world.target(c, "headquarters")
        return Problem(
            kind,
            (p.id,),
            {
                "en": f"In which city is the company that {p.name['en']} works for headquartered?",
                "zh": f"{p.name['zh']}工作的公司总部在哪座城市？",
            },
            {
                "en": [
                    f"{p.name['en']} works for {c.name['en']}.",
                    f"{c.name['en']} is headquartered in {h.name['en']}.",
                ],
                "zh": [f"{p.name['zh']}在{c.name['zh']}工作。", f"{c.name['zh']}的总部位于{h.name['zh']}。"],
            },
            dict(h.name),
            {"en": [h.name["zh"]], "zh": [h.name["en"]]},
            numeric=False,
        )
    raise ValueError(f"unknown multistep kind {kind!r}")


def sample(
    world: World, group: str, rng: random.Random, n: int, exclude: set[tuple[str, ...]], kinds: tuple[str, ...] = KINDS
) -> list[Problem]:
    """n distinct problems (by key) over `group`, none in `exclude`; kinds are drawn uniformly."""
    seen: set[tuple[str, ...]] = set()
    out: list[Problem] = []
    for _ in range(n * 30):
        if len(out) == n:
            break
        p = make(world, rng.choice(kinds), rng, group)
        if p is None or p.key in exclude or p.key in seen:
            continue
        seen.add(p.key)
        out.append(p)
    return out
