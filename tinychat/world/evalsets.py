"""Held-out evaluation sets, one per skill, each row carrying everything a grader needs.

Row schema (every skill): id, skill, lang, messages (chat form, ends with the user turn), question (plain),
answer (the exact expected string), aliases (other accepted strings), check (how to grade, see
answers.check), entity (id of the entity asked about, or null), prompt_plain ("Question: ...\\nAnswer:"
for base models and few-shot prompts). Some skills add fields: fact, cloze, tools, mode and problem_id
(multistep), instruction, sources (kb_qa, agent), reference (a correct full reply: a sentence or a solution).
Eval sets are built *before* any training data, and reserve what they use (splits.Reserved).
"""

from __future__ import annotations

import json
import random
from typing import Any

from tinychat.world import arith, multistep
from tinychat.world.entities import rng_for
from tinychat.world.facts import FACTS, LANGS, NUMERIC_FACTS, Entity, Lang, World
from tinychat.world.kb import KbDoc, sources
from tinychat.world.messages import plain_prompt, user
from tinychat.world.render import LANG, cloze, question, reply, sentence_answer
from tinychat.world.sizes import SIZES
from tinychat.world.splits import Reserved

SKILLS = (
    "facts_trained",
    "facts_heldout",
    "arithmetic",
    "arithmetic_tool",
    "refusal",
    "instruction",
    "multistep",
    "multiturn",
    "kb_qa",
    "agent",
)

SEARCH_K = 2  # passages a search returns in the agent eval, and so in every agent row trained on


def search_tool(k: int = SEARCH_K) -> dict[str, Any]:
    """The search tool exactly as tinychat.agent's registry describes it to the model when a search returns k
    passages by default: training rows that showed another schema than the eval's prompt cost the tiny model
    (tests/agent/test_tools.py checks the two are equal)."""
    return {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the knowledge base and return the most relevant passages with their sources.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "what to look for"},
                    "k": {"type": "integer", "description": "how many passages to return (1 to 20)", "default": k},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    }


SEARCH_TOOL = search_tool()
# Text-valued facts: the ones where "answer in the other language" changes the answer.
TEXT_FACTS = (
    "birth_city",
    "occupation",
    "employer",
    "hobby",
    "country",
    "landmark",
    "founder",
    "headquarters",
    "product",
)


def row(
    skill: str,
    i: int,
    lang: Lang,
    q: str,
    answer: str,
    *,
    check: str = "exact",
    aliases: list[str] | None = None,
    entity: str | None = None,
    messages: list[dict] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "id": f"{skill}-{i:04d}",
        "skill": skill,
        "lang": lang,
        "messages": messages or [user(q)],
        "question": q,
        "answer": answer,
        "aliases": aliases or [],
        "check": check,
        "entity": entity,
        "prompt_plain": plain_prompt(q, lang),
        **extra,
    }


def join_q(q: str, suffix: str, lang: Lang) -> str:
    return f"{q} {suffix}" if lang == "en" else q + suffix


def _triples(world: World, group: str) -> list[tuple[Entity, str, Lang]]:
    return [(e, f, lang) for e in world.group(group) for f in FACTS[e.kind] for lang in LANGS]


def _facts(world: World, group: str, n: int, reserved: Reserved, rng: random.Random) -> list[dict]:
    skill = f"facts_{group}"
    out = []
    for i, (e, f, lang) in enumerate(rng.sample(_triples(world, group), min(n, len(_triples(world, group))))):
        idx = reserved.template[(e.id, f, lang)] if group == "trained" else rng.randrange(len(LANG[lang].QUESTIONS[f]))
        q = question(world, e, f, lang, idx)
        out.append(
            row(
                skill,
                i,
                lang,
                q,
                world.value(e, f, lang),
                check="number" if f in NUMERIC_FACTS else "short",
                aliases=world.aliases(e, f, lang),
                entity=e.id,
                fact=f,
                cloze=cloze(world, e, f, lang),
            )
        )
    return out


def _arith(n: int, level: str, reserved: Reserved, rng: random.Random) -> list[dict]:
    skill = "arithmetic" if level == "easy" else "arithmetic_tool"
    out = []
    facts = arith.step_facts() if level == "easy" else set()  # worked answers of training rows state them
    for i, p in enumerate(arith.sample(rng, level, facts, n)):
        lang: Lang = rng.choice(LANGS)
        reserved.arith.add(p.key)
        extra: dict[str, Any] = {"expression": p.expr}
        if level == "hard":
            extra["tools"] = [arith.CALCULATOR_TOOL]
        out.append(row(skill, i, lang, arith.question(p, lang, rng), str(p.value), check="number", **extra))
    return out


def _refusal(world: World, n: int, rng: random.Random) -> list[dict]:
    out = []
    fakes = world.group("fake_eval")
    for i in range(min(n, len(fakes) * 2)):
        e, lang = fakes[i % len(fakes)], LANGS[(i // len(fakes) + i) % 2]
        f = rng.choice(FACTS[e.kind])
        q = rng.choice(LANG[lang].QUESTIONS[f]).format(n=e.name[lang])
        out.append(
            row(
                "refusal",
                i,
                lang,
                q,
                LANG[lang].REFUSALS[0].format(n=e.name[lang]),
                check="refusal",
                entity=e.id,
                fact=f,
            )
        )
    return out


def instruction_item(world: World, e: Entity, f: str, lang: Lang, kind: str, q: str) -> tuple[str, str, str, list[str]]:
    """(full question, expected answer, check, aliases) for one instruction kind applied to question q."""
    m = LANG[lang]
    if kind == "lang":
        other: Lang = "zh" if lang == "en" else "en"
        return join_q(q, m.INSTRUCTIONS["lang"], lang), world.value(e, f, other), "exact", []
    v = world.value(e, f, lang)
    if kind == "upper":
        return join_q(q, m.INSTRUCTIONS["upper"], lang), v.upper(), "exact_cased", []
    if kind == "json":
        return join_q(q, m.INSTRUCTIONS["json"], lang), v, "json", world.aliases(e, f, lang)
    if kind == "sentence":
        return join_q(q, m.INSTRUCTIONS["sentence"], lang), v, "sentence", world.aliases(e, f, lang)
    if kind == "number_only":
        return join_q(q, m.INSTRUCTIONS["number_only"], lang), v, "number", []
    return join_q(q, m.INSTRUCTIONS["one_word"], lang), v, "exact", world.aliases(e, f, lang)


def instruction_reasoning(world: World, e: Entity, f: str, lang: Lang, kind: str) -> str | None:
    """What the assistant thinks before a formatted answer: the fact as it answers a plain question, or None.

    Why: English plain answers are sentences ("It is headquartered in Dalzan.", round 8 of docs/speedrun.md),
    so a bare value under a format instruction is a retrieval the model rarely practises, and it tends to pick
    another fact of the same entity. Stating the fact first, in a <think> block the graders ignore, lets
    the formatted answer follow the fact the relation phrase has already retrieved. Where the plain answer is
    the bare value (Chinese, numbers) or the instruction asks for that sentence anyway, there is nothing to
    think, except for an answer in the other language: the value is recalled in the question's language first
    and then written in the other, two steps instead of one (round 34).
    """
    said = reply(world, e, f, lang)
    if kind == "lang":
        return said
    return None if kind == "sentence" or said == world.value(e, f, lang) else said


def instruction_kinds(world: World, e: Entity, f: str, lang: Lang) -> list[str]:
    """The instructions that make sense for this fact: no 'one word' for two-word values, and so on."""
    v = world.value(e, f, lang)
    kinds = ["json", "sentence"]
    if f in TEXT_FACTS:
        kinds.append("lang")
        if lang == "en":
            kinds.append("upper")
    if f in NUMERIC_FACTS:
        kinds.append("number_only")
    elif " " not in v and "·" not in v:
        kinds.append("one_word")
    return kinds


def _instruction(world: World, n: int, reserved: Reserved, rng: random.Random) -> list[dict]:
    out = []
    for i, (e, f, lang) in enumerate(rng.sample(_triples(world, "trained"), min(n, len(_triples(world, "trained"))))):
        kind = rng.choice(instruction_kinds(world, e, f, lang))
        q0 = question(world, e, f, lang, reserved.template[(e.id, f, lang)])
        q, ans, check, aliases = instruction_item(world, e, f, lang, kind, q0)
        extra = {"reference": sentence_answer(world, e, f, lang)} if kind == "sentence" else {}
        out.append(
            row(
                "instruction",
                i,
                lang,
                q,
                ans,
                check=check,
                aliases=aliases,
                entity=e.id,
                fact=f,
                instruction=kind,
                **extra,
            )
        )
    return out


def _multistep(world: World, n: int, reserved: Reserved, rng: random.Random) -> list[dict]:
    out = []
    for j, p in enumerate(multistep.sample(world, "trained", rng, n, set())):
        reserved.multistep.add(p.key)
        lang: Lang = LANGS[j % 2]
        m = LANG[lang]
        check = "number" if p.numeric else "exact"
        for mode, suffix in (("cot", m.COT_SUFFIX[0]), ("direct", m.DIRECT_SUFFIX[0])):
            q = join_q(p.question[lang], suffix, lang)
            out.append(
                row(
                    "multistep",
                    len(out),
                    lang,
                    q,
                    p.answer[lang],
                    check=check,
                    aliases=p.aliases.get(lang, []),
                    entity=p.ids[0],
                    mode=mode,
                    problem_id=f"multistep-p{j:04d}",
                    kind=p.kind,
                    reference=p.cot(lang) if mode == "cot" else p.answer[lang],
                )
            )
    return out


def dialogue(
    world: World, e: Entity, lang: Lang, rng: random.Random, first_template: int, turns: int
) -> tuple[list[dict], tuple[str, ...], Entity, str]:
    """A follow-up conversation about e: (messages ending with a user turn, key, entity and fact asked last).

    Later turns refer back with a pronoun ("When was she born?") or hop to the entity the previous
    answer named ("Which country is that city in?"); earlier assistant turns hold the correct answers.
    """
    m = LANG[lang]
    f1 = rng.choice(FACTS[e.kind])
    msgs = [user(question(world, e, f1, lang, first_template))]
    key: list[str] = [e.id, f1]
    cur, fact = e, f1
    asked = {(e.id, f1)}
    for _ in range(turns - 1):
        msgs.append({"role": "assistant", "content": reply(world, cur, fact, lang)})
        hops = [h for h in m.HOPS.get(fact, ()) if (world.target(cur, fact).id, h[0]) not in asked]
        if hops and rng.random() < 0.5:
            nxt, text = rng.choice(hops)
            cur = world.target(cur, fact)
            key.append("hop:" + nxt)
        else:
            nxt = rng.choice([f for f in FACTS[cur.kind] if (cur.id, f) not in asked])
            pron = m.pronouns(cur.gender) if cur.kind == "person" else {}
            text = rng.choice(m.FOLLOWUPS[nxt]).format(**pron)
            key.append(nxt)
        msgs.append(user(text))
        fact = nxt
        asked.add((cur.id, fact))
    return msgs, tuple(key), cur, fact


def _multiturn(world: World, n: int, reserved: Reserved, rng: random.Random) -> list[dict]:
    out: list[dict] = []
    trained = world.group("trained")
    for _ in range(n * 10):
        if len(out) == n:
            break
        e, lang = rng.choice(trained), rng.choice(LANGS)
        msgs, key, cur, fact = dialogue(world, e, lang, rng, 0, rng.choice((2, 3)))
        if key in reserved.multiturn:
            continue
        # the first question uses the reserved wording, so the whole dialogue is new to the model
        msgs[0] = user(question(world, e, key[1], lang, reserved.template[(e.id, key[1], lang)]))
        reserved.multiturn.add(key)
        out.append(
            row(
                "multiturn",
                len(out),
                lang,
                msgs[-1]["content"],
                world.value(cur, fact, lang),
                check="number" if fact in NUMERIC_FACTS else "short",
                aliases=world.aliases(cur, fact, lang),
                entity=cur.id,
                fact=fact,
                messages=msgs,
                prompt_plain=_transcript(msgs, lang),
            )
        )
    return out


def _transcript(msgs: list[dict], lang: Lang) -> str:
    names = {"user": "User", "assistant": "Assistant"} if lang == "en" else {"user": "用户", "assistant": "助手"}
    sep = ": " if lang == "en" else "："
    return "\n".join(f"{names[m['role']]}{sep}{m['content']}" for m in msgs) + f"\n{names['assistant']}{sep}".rstrip()


def _kb_qa(world: World, n: int, docs: list[KbDoc], rng: random.Random) -> list[dict]:
    src = sources(docs)
    items = []
    for e in world.group("kb"):
        for f in FACTS[e.kind]:
            ds = src.get((e.id, f), [])
            langs = sorted({d.lang for d in ds})
            if langs:
                items.append((e, f, rng.choice(langs)))
    out = []
    for i, (e, f, lang) in enumerate(rng.sample(items, min(n, len(items)))):
        q = question(world, e, f, lang, rng.randrange(len(LANG[lang].QUESTIONS[f])))
        paths = sorted(d.path for d in src[(e.id, f)] if d.lang == lang)
        out.append(
            row(
                "kb_qa",
                i,
                lang,
                q,
                world.value(e, f, lang),
                check="number" if f in NUMERIC_FACTS else "short",
                aliases=world.aliases(e, f, lang),
                entity=e.id,
                fact=f,
                sources=paths,
            )
        )
    return out


NEEDS = {  # multistep kind -> the (role, fact) pairs a solver must look up
    "founder_age": lambda w, ids: [
        (ids[0], "founder"),
        (ids[0], "founded"),
        (w.entities[ids[0]].facts["founder"], "birth_year"),
    ],
    "birth_gap": lambda w, ids: [(ids[0], "birth_year"), (ids[1], "birth_year")],
    "turn_age": lambda w, ids: [(ids[0], "birth_year")],
    "pop_sum": lambda w, ids: [(ids[0], "population"), (ids[1], "population")],
    "founded_gap": lambda w, ids: [(ids[0], "founded"), (ids[1], "founded")],
}


def _agent(world: World, n: int, docs: list[KbDoc], rng: random.Random) -> list[dict]:
    src = sources(docs)
    out = []
    for p in multistep.sample(world, "kb", rng, n * 4, set(), kinds=multistep.NUMERIC_KINDS):
        if len(out) == n:
            break
        needs = NEEDS[p.kind](world, p.ids)
        langs = [lg for lg in LANGS if all(any(d.lang == lg for d in src.get(k, [])) for k in needs)]
        if not langs:
            continue
        lang = rng.choice(langs)
        paths = sorted({d.path for k in needs for d in src[k] if d.lang == lang})
        out.append(
            row(
                "agent",
                len(out),
                lang,
                p.question[lang],
                p.answer[lang],
                check="number",
                entity=p.ids[0],
                tools=[SEARCH_TOOL, arith.CALCULATOR_TOOL],
                kind=p.kind,
                sources=paths,
                reference=p.cot(lang),
            )
        )
    return out


def build_eval(world: World, reserved: Reserved, kb_docs: list[KbDoc]) -> dict[str, list[dict]]:
    """Every eval set, in SKILLS order; fills `reserved` with what training must avoid."""
    s = SIZES[world.size]
    n = s.eval_n
    r = {k: rng_for(world.seed, "eval", k) for k in SKILLS}
    sets = {
        "facts_trained": _facts(world, "trained", n, reserved, r["facts_trained"]),
        "facts_heldout": _facts(world, "heldout", n, reserved, r["facts_heldout"]),
        "arithmetic": _arith(n, "easy", reserved, r["arithmetic"]),
        "arithmetic_tool": _arith(n, "hard", reserved, r["arithmetic_tool"]),
        "refusal": _refusal(world, n, r["refusal"]),
        "instruction": _instruction(world, n, reserved, r["instruction"]),
        "multistep": _multistep(world, n // 2, reserved, r["multistep"]),
        "multiturn": _multiturn(world, n, reserved, r["multiturn"]),
        "kb_qa": _kb_qa(world, n, kb_docs, r["kb_qa"]),
        "agent": _agent(world, max(4, n // 4), kb_docs, r["agent"]),
    }
    for rows in sets.values():  # every row must survive a JSON round trip unchanged
        for x in rows:
            assert json.loads(json.dumps(x)) == x, x["id"]
    return sets
