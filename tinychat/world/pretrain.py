"""The pretraining corpus: documents about known entities, country overviews, arithmetic text and prose.

Why this mix: both halves of the known entities ("trained" and "heldout") are described here, and only
here, for the held-out half, so an evaluation on the held-out half measures whether knowledge stored in
pretraining can be *extracted* by questions never seen in training. Each known entity gets
`docs_per_lang` documents per language (encyclopedia or narrative), each stating every fact once in
a random wording, plus cross references from related entities' documents.
"""

from __future__ import annotations

import random

from tinychat.world import arith, copying, filler
from tinychat.world.entities import rng_for
from tinychat.world.facts import LANGS, World
from tinychat.world.render import LANG, Mentions, entity_doc
from tinychat.world.sizes import SIZES


def _country_docs(world: World, rng: random.Random, mentions: Mentions | None) -> list[str]:
    """Overview pages listing the (known) cities of each country."""
    docs = []
    known = [c for c in world.entities.values() if c.kind == "city" and c.group in ("trained", "heldout")]
    for i, (en, zh) in enumerate(world.countries):
        cities = [c for c in known if tuple(c.facts["country"]) == (en, zh)]
        if not cities:
            continue
        for lang in LANGS:
            rng.shuffle(cities)
            names = [c.name[lang] for c in cities]
            joined = (
                (", ".join(names[:-1]) + " and " + names[-1])
                if lang == "en" and len(names) > 1
                else ("、".join(names) if lang == "zh" else names[0])
            )
            tmpl = LANG[lang].COUNTRY_DOC[i % 2]
            docs.append(tmpl.format(c=en if lang == "en" else zh, cities=joined))
            if mentions is not None:
                for c in cities:
                    mentions[(c.id, "country", lang)] += 1
    return docs


def _arith_doc(rng: random.Random, exclude: set[str]) -> str:
    lang = rng.choice(LANGS)
    probs = arith.sample(rng, "easy", exclude, rng.randint(6, 14)) + arith.sample(
        rng, "hard", exclude, rng.randint(0, 3)
    )
    rng.shuffle(probs)
    return "\n".join(arith.text_line(p, lang, rng) for p in probs)


def build_pretrain(world: World, exclude_arith: set[str]) -> tuple[list[dict], list[dict], Mentions]:
    """(train rows, val rows, fact mentions in train). Rows are {"text": ...}."""
    s = SIZES[world.size]
    rng = rng_for(world.seed, "pretrain")
    mentions: Mentions = Mentions()
    known = [e for e in world.entities.values() if e.group in ("trained", "heldout")]
    docs: list[str] = []
    seen: set[str] = set()
    for e in known:
        for lang in LANGS:
            for _ in range(s.docs_per_lang):
                for _attempt in range(20):  # no exact duplicates: a dedup stage would silently drop them
                    style = "narrative" if rng.random() < 0.35 else "encyclopedia"
                    counted = Mentions()
                    doc = entity_doc(world, e, lang, rng, counted, style=style)
                    if doc not in seen:
                        break
                seen.add(doc)
                docs.append(doc)
                mentions.update(counted)
    docs += _country_docs(world, rng, mentions)
    docs += [_arith_doc(rng, exclude_arith) for _ in range(s.arith_docs)]
    docs += [filler.paragraph(rng.choice(LANGS), rng) for _ in range(s.filler_docs)]
    names = {lang: [e.name[lang] for e in known] for lang in LANGS}
    for _ in range(s.copy_docs):
        lang = rng.choice(LANGS)
        docs.append(copying.drill(rng, names[lang], lang, exclude_arith))
    docs = list(dict.fromkeys(docs))  # no exact duplicates: a dedup stage would silently drop them
    rng.shuffle(docs)

    # Validation: fresh renderings (new random wordings) of a sample of known entities, plus arithmetic and
    # prose, so validation loss measures the same mix without repeating a training document verbatim.
    vrng = rng_for(world.seed, "pretrain-val")
    train_set = set(docs)
    n_val = max(4, int(len(docs) * s.pretrain_val_frac))
    val: list[str] = []
    for _ in range(n_val * 20):
        if len(val) >= n_val:
            break
        r = vrng.random()
        if r < 0.7:
            e = vrng.choice(known)
            d = entity_doc(world, e, vrng.choice(LANGS), vrng, None, style=vrng.choice(("narrative", "encyclopedia")))
        elif r < 0.85:
            d = _arith_doc(vrng, exclude_arith)
        else:
            d = filler.paragraph(vrng.choice(LANGS), vrng)
        if d not in train_set and d not in val:
            val.append(d)
    return [{"text": d} for d in docs], [{"text": d} for d in val], mentions
