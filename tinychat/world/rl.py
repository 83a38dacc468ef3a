"""RL prompts with verifiable answers, for GRPO-style training with a programmatic reward.

Why these: the reward must be computable without a judge, so every prompt has an exact answer and a
`check` that tinychat.world.answers.check applies: arithmetic (a number), facts about "trained" entities
(the value, bare or stated in one short sentence), and multi-step problems asked step by step (the number
after "Answer:").
Rows: {"messages", "answer", "aliases", "check", "skill", "lang"}; eval items are never reused.
"""

from __future__ import annotations

from tinychat.world import arith, multistep
from tinychat.world.entities import rng_for
from tinychat.world.evalsets import join_q
from tinychat.world.facts import FACTS, LANGS, NUMERIC_FACTS, World
from tinychat.world.messages import user
from tinychat.world.render import LANG, question
from tinychat.world.sizes import SIZES
from tinychat.world.splits import Reserved


def build_rl(world: World, reserved: Reserved) -> list[dict]:
    s = SIZES[world.size]
    rng = rng_for(world.seed, "rl")
    n_arith, n_ms = int(s.rl * 0.35), int(s.rl * 0.3)
    rows: list[dict] = []
    for p in arith.sample(rng, "easy", reserved.arith, n_arith):
        lang = rng.choice(LANGS)
        rows.append(
            {
                "messages": [user(arith.question(p, lang, rng))],
                "answer": str(p.value),
                "aliases": [],
                "check": "number",
                "skill": "arithmetic",
                "lang": lang,
            }
        )
    for j, p in enumerate(multistep.sample(world, "trained", rng, n_ms, reserved.multistep)):
        lang = LANGS[j % 2]
        q = join_q(p.question[lang], rng.choice(LANG[lang].COT_SUFFIX), lang)
        rows.append(
            {
                "messages": [user(q)],
                "answer": p.answer[lang],
                "aliases": p.aliases.get(lang, []),
                "check": "number" if p.numeric else "exact",
                "skill": "multistep",
                "lang": lang,
            }
        )
    trained = world.group("trained")
    seen: set[str] = set()
    for _ in range(s.rl * 20):
        if len(rows) >= s.rl:
            break
        e, lang = rng.choice(trained), rng.choice(LANGS)
        f = rng.choice(FACTS[e.kind])
        q = question(world, e, f, lang, rng.choice(reserved.train_templates(e.id, f, lang)))
        if q in seen:
            continue
        seen.add(q)
        rows.append(
            {
                "messages": [user(q)],
                "answer": world.value(e, f, lang),
                "aliases": world.aliases(e, f, lang),
                "check": "number" if f in NUMERIC_FACTS else "short",
                "skill": "facts",
                "lang": lang,
            }
        )
    rng.shuffle(rows)
    return rows
