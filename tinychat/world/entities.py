"""Building the world: countries, then closed groups of people, cities and companies, then fake names.

Why closed groups: each group ("trained", "heldout", "kb", "ragtrain") is its own small world whose relations
(birth city, employer, founder, headquarters) point only inside the group. Which splits may show a group is
then a property of the group, and a leak is a name appearing where its group is not allowed (splits.py).
"""

from __future__ import annotations

import math
import random

from tinychat.world.facts import Entity, World
from tinychat.world.names import NameRegistry
from tinychat.world.sizes import SIZES
from tinychat.world.vocab import COMPANY_SUFFIXES, HOBBIES, LANDMARK_ADJ, LANDMARK_NOUN, OCCUPATIONS, PRODUCTS


def rng_for(seed: int, *parts: str) -> random.Random:
    """An independent, reproducible random stream per purpose (string seeds hash with SHA-512, not hash())."""
    return random.Random(":".join(["tinyworld", str(seed), *parts]))


def _population(rng: random.Random) -> int:
    v = int(math.exp(rng.uniform(math.log(20_000), math.log(5_000_000))))
    k = 10 ** (len(str(v)) - 3)
    return v // k * k  # three significant digits, so the number is memorable and exact


class _Builder:
    def __init__(self, seed: int, size: str) -> None:
        self.world = World(seed=seed, size=size, countries=[])
        self.names = NameRegistry(rng_for(seed, "names"))
        self.counters = {"person": 0, "city": 0, "company": 0}
        lm = [(a, n) for a in LANDMARK_ADJ for n in LANDMARK_NOUN]
        rng_for(seed, "landmarks").shuffle(lm)
        self.landmarks = [(f"{a[0]} {n[0]}", a[1] + n[1]) for a, n in lm]
        assert len({z for _, z in self.landmarks}) == len(self.landmarks)

    def _id(self, kind: str) -> str:
        self.counters[kind] += 1
        return f"{kind}-{self.counters[kind]:04d}"

    def group(self, group: str, people: int, cities: int, companies: int) -> None:
        w, rng = self.world, rng_for(self.world.seed, "group", group)
        cs = []
        for _ in range(cities):
            en, zh = self.names.place()
            cs.append(
                w.add(
                    Entity(
                        self._id("city"),
                        "city",
                        group,
                        {"en": en, "zh": zh},
                        {
                            "country": rng.choice(w.countries),
                            "population": _population(rng),
                            "landmark": self.landmarks.pop(),
                        },
                    )
                )
            )
        ps = []
        for _ in range(people):
            en, zh = self.names.person()
            ps.append(
                w.add(
                    Entity(
                        self._id("person"),
                        "person",
                        group,
                        {"en": en, "zh": zh},
                        {
                            "birth_year": rng.randint(1935, 2002),
                            "birth_city": rng.choice(cs).id,
                            "occupation": rng.choice(OCCUPATIONS),
                            "employer": "",
                            "hobby": rng.choice(HOBBIES),
                        },
                        gender=rng.choice("fm"),
                    )
                )
            )
        pool = [p for p in ps if p.facts["birth_year"] <= 1990]
        if len(pool) < companies:
            pool = sorted(ps, key=lambda p: p.facts["birth_year"])[:companies]
        founders = rng.sample(pool, companies)
        cos = []
        for founder in founders:
            stem_en, stem_zh = self.names.place()
            suf = rng.choice(COMPANY_SUFFIXES)
            born = founder.facts["birth_year"]
            year = born + rng.randint(22, max(22, min(55, 2023 - born)))
            cos.append(
                w.add(
                    Entity(
                        self._id("company"),
                        "company",
                        group,
                        {"en": f"{stem_en} {suf[0]}", "zh": stem_zh + suf[1]},
                        {
                            "founder": founder.id,
                            "founded": year,
                            "headquarters": rng.choice(cs).id,
                            "product": rng.choice(PRODUCTS),
                        },
                    )
                )
            )
            founder.facts["employer"] = cos[-1].id  # founders work at the company they founded
        for p in ps:
            if not p.facts["employer"]:
                p.facts["employer"] = rng.choice(cos).id

    def fakes(self, group: str, n: int) -> None:
        """Names that exist nowhere in the world: the subjects of honest refusals."""
        rng = rng_for(self.world.seed, "group", group)
        for _ in range(n):
            kind = rng.choice(("person", "person", "person", "city", "company"))
            if kind == "person":
                en, zh = self.names.person()
            elif kind == "city":
                en, zh = self.names.place()
            else:
                (en, zh), suf = self.names.place(), rng.choice(COMPANY_SUFFIXES)
                en, zh = f"{en} {suf[0]}", zh + suf[1]
            self.world.add(
                Entity(
                    self._id(kind),
                    kind,
                    group,
                    {"en": en, "zh": zh},
                    gender=rng.choice("fm") if kind == "person" else "",
                )
            )


def build_world(seed: int, size: str) -> World:
    """The deterministic entity graph for (seed, size); no text yet."""
    s = SIZES[size]
    b = _Builder(seed, size)
    b.world.countries = [b.names.country() for _ in range(s.countries)]
    b.group("trained", *s.known)
    b.group("heldout", *s.known)
    b.group("kb", *s.kb)
    b.group("ragtrain", *s.ragtrain)
    b.fakes("fake_train", s.fakes_train)
    b.fakes("fake_eval", s.fakes_eval)
    return b.world
