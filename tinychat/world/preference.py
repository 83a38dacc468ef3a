"""Preference pairs: one prompt, a chosen reply that is right and obeys, a rejected one that is not.

Why these kinds of rejection: they are the failures alignment should remove, each with a clean signal:
  fact         a hallucinated value of the right type (another entity's value);
  refusal      a confident made-up answer about a name that does not exist (chosen: "I don't know");
  overrefusal  "I don't know" about an entity the model does know (chosen: the answer);
  instruction  the right content ignoring the instruction (wrong language, no JSON, no capitals, ...);
  arithmetic   the same worked columns read back to an off-by-a-little result; multistep: the same
               step-by-step solution with a wrong answer after it;
  tool         a hard problem with the calculator offered: chosen calls it and answers its result, rejected
               answers an off-by-a-little number without it (DPO without these pairs moved the model off the
               tool: arithmetic_tool 80% -> 67%, docs/speedrun.md round 24).
Only "trained" entities and "fake_train" names appear, with training question wordings.
"""

from __future__ import annotations

import random
from typing import Any

from tinychat.world import arith, multistep
from tinychat.world.entities import rng_for
from tinychat.world.evalsets import instruction_kinds, join_q
from tinychat.world.facts import FACTS, LANGS, Entity, Lang, World
from tinychat.world.messages import assistant, user
from tinychat.world.render import LANG, question, reply, sentence_answer
from tinychat.world.sft import calculator_turns, instruction_turns, split_rows, worked_answer
from tinychat.world.sizes import SIZES
from tinychat.world.splits import Reserved


def wrong_value(world: World, e: Entity, fact: str, lang: Lang, rng: random.Random, group: str = "trained") -> str:
    """A plausible but wrong value for (e, fact): same type, different value."""
    right = world.value(e, fact, lang) if e.facts else None
    if fact in ("birth_year", "founded"):
        base = int(right) if right else rng.randint(1940, 2000)
        return str(base + rng.choice((-1, 1)) * rng.randint(1, 15))
    if fact == "population":
        base = int(right) if right else rng.randint(20, 5000) * 1000
        return str(base + rng.choice((-1, 1)) * rng.randint(1, 9) * 10 ** max(1, len(str(base)) - 2))
    kind = e.kind
    pool = [x for x in world.group(group, kind) if x.id != e.id and x.facts]
    for _ in range(50):
        other = rng.choice(pool)
        v = world.value(other, fact, lang)
        if v != right:
            return v
    raise AssertionError(f"no wrong value for {fact}")


def pair(
    prompt: list[dict], chosen: str, rejected: str, skill: str, lang: Lang, reasoning: str | None = None
) -> dict[str, Any]:
    """A preference row; `reasoning` (a <think> block) is the same in both replies, so only the answers differ."""
    assert chosen != rejected
    return {
        "prompt": prompt,
        "chosen": [assistant(chosen, reasoning)],
        "rejected": [assistant(rejected, reasoning)],
        "skill": skill,
        "lang": lang,
    }


def build_preference(world: World, reserved: Reserved) -> tuple[list[dict], list[dict]]:
    s = SIZES[world.size]
    rng = rng_for(world.seed, "preference")
    trained, fakes = world.group("trained"), world.group("fake_train")
    ms = multistep.sample(
        world, "trained", rng, max(4, s.preference // 6), reserved.multistep, kinds=multistep.NUMERIC_KINDS
    )
    arith_pool = arith.sample(rng, "easy", reserved.arith, max(4, s.preference // 8))
    rows = []
    kinds = (
        ("fact",) * 6
        + ("refusal",) * 3
        + ("overrefusal",) * 2
        + ("instruction",) * 4
        + ("arithmetic",) * 2
        + ("multistep",) * 3
    )
    for i in range(s.preference):
        kind, lang = kinds[i % len(kinds)], rng.choice(LANGS)
        m = LANG[lang]
        if kind in ("fact", "overrefusal", "instruction"):
            e = rng.choice(trained)
            f = rng.choice(FACTS[e.kind])
            q = question(world, e, f, lang, rng.choice(reserved.train_templates(e.id, f, lang)))
            v = world.value(e, f, lang)
            if kind == "fact":
                wrong = wrong_value(world, e, f, lang, rng)
                rows.append(pair([user(q)], reply(world, e, f, lang), reply(world, e, f, lang, wrong), "fact", lang))
            elif kind == "overrefusal":
                refusal = rng.choice(m.REFUSALS).format(n=e.name[lang])
                rows.append(pair([user(q)], reply(world, e, f, lang), refusal, "overrefusal", lang))
            else:
                ik = rng.choice(instruction_kinds(world, e, f, lang))
                asked, answered = instruction_turns(world, e, f, lang, ik, q)  # the SFT's row: chosen
                chosen = answered["content"]
                rejected = sentence_answer(world, e, f, lang) if ik in ("one_word", "number_only") else v
                if chosen == rejected:  # e.g. capitals of an already upper-case value: no signal, skip
                    continue
                rows.append(pair([asked], chosen, rejected, "instruction", lang, answered.get("reasoning_content")))
        elif kind == "refusal":
            e = rng.choice(fakes)
            f = rng.choice(FACTS[e.kind])
            q = rng.choice(m.QUESTIONS[f]).format(n=e.name[lang])
            # the hallucination: a value drawn from a real entity of the same kind
            proxy = rng.choice(world.group("trained", e.kind))
            rows.append(
                pair(
                    [user(q)],
                    rng.choice(m.REFUSALS).format(n=e.name[lang]),
                    reply(world, e, f, lang, world.value(proxy, f, lang)),
                    "refusal",
                    lang,
                )
            )
        elif kind == "arithmetic":
            p = rng.choice(arith_pool)
            good = worked_answer(p, lang)
            bad = worked_answer(p, lang, p.value + rng.choice((-1, 1)) * rng.randint(1, 10))
            rows.append(pair([user(arith.question(p, lang, rng))], good, bad, "arithmetic", lang))
        else:
            p = rng.choice(ms)
            good = p.cot(lang)
            wrong = str(int(p.answer[lang]) + rng.choice((-1, 1)) * rng.randint(1, 9))
            bad = p.cot(lang, wrong)  # the columns misread
            q = join_q(p.question[lang], rng.choice(m.COT_SUFFIX), lang)
            rows.append(pair([user(q)], good, bad, "multistep", lang))
    rows += tool_pairs(rng_for(world.seed, "preference-tool"), reserved.arith, max(2, s.preference // 12))
    return split_rows(rows, s.post_val_frac, rng_for(world.seed, "preference-split"))


def tool_pairs(rng: random.Random, exclude: set[str], n: int) -> list[dict[str, Any]]:
    """n pairs on hard problems with the calculator offered: the call, its result and the answer against a
    direct answer that is a little off. Their own random stream, so the other pairs are those of before."""
    rows = []
    for p in arith.sample(rng, "hard", exclude, n):
        lang = rng.choice(LANGS)
        bad = str(p.value + rng.choice((-1, 1)) * rng.randint(1, 10))
        prompt, *chosen = calculator_turns(p, lang, rng)
        rows.append(
            {
                "prompt": [prompt],
                "chosen": chosen,
                "rejected": [assistant(bad)],
                "tools": [arith.CALCULATOR_TOOL],
                "skill": "tool",
                "lang": lang,
            }
        )
    return rows
