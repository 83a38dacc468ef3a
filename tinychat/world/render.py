"""Turning entities into sentences, documents and questions in either language.

Why one place: pretraining documents, SFT answers, knowledge-base files and eval questions all draw on
the same template tables (render_en / render_zh), so a fact reads the same way wherever it appears, and
the mention counter sees every sentence that states a fact.
"""

from __future__ import annotations

import random
from collections import Counter
from types import ModuleType

from tinychat.world import render_en, render_zh
from tinychat.world.facts import FACTS, Entity, Lang, World

LANG: dict[str, ModuleType] = {"en": render_en, "zh": render_zh}
JOIN = {"en": " ", "zh": ""}

# (entity id, fact, lang) -> how many sentences state it; filled while rendering pretraining text.
Mentions = Counter


def slots(world: World, e: Entity, lang: Lang) -> dict[str, str]:
    """Every placeholder a template about `e` may use, in `lang`."""
    m = LANG[lang]
    out = {"n": e.name[lang]}
    out.update(
        m.pronouns(e.gender)
        if e.kind == "person"
        else ({"he": "it", "his": "its", "him": "it", "He": "It", "His": "Its"} if lang == "en" else {"ta": "它"})
    )
    for f in FACTS[e.kind]:
        if f in e.facts:
            v = world.value(e, f, lang)
            out[f] = v
            if lang == "en":
                out["a_" + f] = render_en.article(v)
    return out


def fact_sentence(world: World, e: Entity, fact: str, lang: Lang, tmpl: str, mentions: Mentions | None = None) -> str:
    s = slots(world, e, lang)
    v = s[fact]
    text = tmpl.format(**s, v=v, a=s.get("a_" + fact, v))
    if mentions is not None:
        mentions[(e.id, fact, lang)] += 1
    return text


def statement(
    world: World,
    e: Entity,
    fact: str,
    lang: Lang,
    rng: random.Random,
    mentions: Mentions | None = None,
    narrative: bool = False,
) -> str:
    """One sentence stating one fact, in a randomly chosen wording."""
    table = LANG[lang].NARRATIVE if narrative else LANG[lang].STATEMENTS
    return fact_sentence(world, e, fact, lang, rng.choice(table[fact]), mentions)


def sentence_answer(world: World, e: Entity, fact: str, lang: Lang) -> str:
    """The canonical full-sentence answer (the first statement template)."""
    return fact_sentence(world, e, fact, lang, LANG[lang].STATEMENTS[fact][0])


def reply(world: World, e: Entity, fact: str, lang: Lang, value: str | None = None) -> str:
    """The assistant's answer to a question about one fact: the language's ANSWERS sentence, else the value.

    `value` replaces the true value (a preference pair's wrong answer, worded the same way). Graded by the
    "short" check (tinychat.world.answers), which takes the bare value too.
    """
    v = world.value(e, fact, lang) if value is None else value
    tmpl = LANG[lang].ANSWERS.get(fact)
    if tmpl is None:
        return v
    a = render_en.article(v) if lang == "en" else v
    return tmpl.format(**slots(world, e, lang), v=v, a=a)


def cloze(world: World, e: Entity, fact: str, lang: Lang) -> dict[str, str]:
    """A statement cut before its value, for scoring base models: {"prompt", "answer"}.

    The English continuation starts with a space (" 1987"); the answer is given without it.
    """
    tmpl = LANG[lang].STATEMENTS[fact][LANG[lang].CLOZE[fact]]
    head, tail = tmpl.split("{v}")
    assert tail in (".", "。", "年。"), tmpl
    s = slots(world, e, lang)
    return {"prompt": head.format(**s).rstrip(), "answer": s[fact]}


def question(world: World, e: Entity, fact: str, lang: Lang, idx: int) -> str:
    return LANG[lang].QUESTIONS[fact][idx].format(**slots(world, e, lang))


def n_questions(fact: str) -> int:
    n = len(render_en.QUESTIONS[fact])
    assert n == len(render_zh.QUESTIONS[fact]), fact
    return n


def _cross_refs(world: World, e: Entity, lang: Lang, rng: random.Random, mentions: Mentions | None) -> list[str]:
    """Sentences about *other* entities that mention `e` (state facts from the other side)."""
    idx = world.index()
    out = []
    if e.kind == "city":
        for pid in rng.sample(idx["born_in"][e.id], min(2, len(idx["born_in"][e.id]))):
            out.append(statement(world, world.entities[pid], "birth_city", lang, rng, mentions))
        for cid in rng.sample(idx["hq_in"][e.id], min(1, len(idx["hq_in"][e.id]))):
            out.append(statement(world, world.entities[cid], "headquarters", lang, rng, mentions))
    elif e.kind == "company":
        for pid in rng.sample(idx["employees"][e.id], min(2, len(idx["employees"][e.id]))):
            out.append(statement(world, world.entities[pid], "employer", lang, rng, mentions))
    else:
        for cid in idx["founded_by"][e.id]:
            out.append(statement(world, world.entities[cid], "founder", lang, rng, mentions))
    return out


def entity_doc(
    world: World,
    e: Entity,
    lang: Lang,
    rng: random.Random,
    mentions: Mentions | None = None,
    style: str = "encyclopedia",
    title: bool = True,
    cross_refs: bool = True,
) -> str:
    """A short document stating every fact of `e` once (plus cross references to related entities)."""
    m = LANG[lang]
    facts = list(FACTS[e.kind])
    sents: list[str] = []
    if style == "narrative":
        first = m.NARRATIVE_OPEN[e.kind].format(n=e.name[lang])
        rest = facts[2:] if e.kind == "person" else facts  # a life story starts with the birth
        rng.shuffle(rest)
        facts = facts[:2] + rest if e.kind == "person" else rest
        body = [statement(world, e, f, lang, rng, mentions, narrative=True) for f in facts]
        sents = [first, *body]
    else:
        intro = ""
        if rng.random() < 0.8:
            tmpl, covered = rng.choice(m.INTROS[e.kind])
            s = slots(world, e, lang)
            intro = tmpl.format(**s)
            for f in covered:
                if mentions is not None:
                    mentions[(e.id, f, lang)] += 1
            facts = [f for f in facts if f not in covered]
        body = [statement(world, e, f, lang, rng, mentions) for f in facts]
        rng.shuffle(body)
        sents = ([intro] if intro else []) + body
    if cross_refs:
        sents += _cross_refs(world, e, lang, rng, mentions)
    text = JOIN[lang].join(sents)
    return f"{e.name[lang]}\n\n{text}" if title else text
