"""The world's entities, their facts, and the one answer string of each fact in each language.

Why these attributes: each type has years (arithmetic over facts), relations to other entities (two-hop
questions), and closed-vocabulary values (exact answers). Relations never cross a group, so a held-out
entity's name never appears in post-training data, not even as the answer to another entity's question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Lang = Literal["en", "zh"]
LANGS: tuple[Lang, ...] = ("en", "zh")
Kind = Literal["person", "city", "company"]

FACTS: dict[str, tuple[str, ...]] = {
    "person": ("birth_year", "birth_city", "occupation", "employer", "hobby"),
    "city": ("country", "population", "landmark"),
    "company": ("founder", "founded", "headquarters", "product"),
}
NUMERIC_FACTS = frozenset({"birth_year", "population", "founded"})
RELATION_FACTS = {"birth_city": "city", "employer": "company", "founder": "person", "headquarters": "city"}

# Groups: which splits may mention an entity (see docs/world.md and splits.py).
GROUPS = ("trained", "heldout", "kb", "ragtrain", "fake_train", "fake_eval")


@dataclass
class Entity:
    """One invented entity. Facts hold raw values: int years/populations, entity ids, (en, zh) pairs."""

    id: str
    kind: Kind
    group: str
    name: dict[str, str]  # {"en": ..., "zh": ...}
    facts: dict[str, Any] = field(default_factory=dict)
    gender: str = ""  # "f" / "m" for people: only for pronouns, never asked about

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "group": self.group,
            "name": self.name,
            "gender": self.gender,
            "facts": self.facts,
        }


@dataclass
class World:
    """Entities by id (insertion order is generation order, so iteration is deterministic)."""

    seed: int
    size: str
    countries: list[tuple[str, str]]
    entities: dict[str, Entity] = field(default_factory=dict)
    _index: dict[str, dict[str, list[str]]] | None = field(default=None, repr=False)
    _groups: dict[tuple[str, str | None], list[Entity]] = field(default_factory=dict, repr=False)

    def index(self) -> dict[str, dict[str, list[str]]]:
        """Reverse relations (born_in, hq_in, employees, founded_by): entity id -> ids pointing at it."""
        if self._index is None:
            idx: dict[str, dict[str, list[str]]] = {k: {} for k in ("born_in", "hq_in", "employees", "founded_by")}
            for e in self.entities.values():
                for k in idx:
                    idx[k][e.id] = []
            for e in self.entities.values():
                if e.kind == "person" and e.facts:
                    idx["born_in"][e.facts["birth_city"]].append(e.id)
                    idx["employees"][e.facts["employer"]].append(e.id)
                elif e.kind == "company" and e.facts:
                    idx["hq_in"][e.facts["headquarters"]].append(e.id)
                    idx["founded_by"][e.facts["founder"]].append(e.id)
            self._index = idx
        return self._index

    def add(self, e: Entity) -> Entity:
        assert e.id not in self.entities, e.id
        self.entities[e.id] = e
        self._index = None
        self._groups.clear()
        return e

    def group(self, group: str, kind: str | None = None) -> list[Entity]:
        """Entities of a group (and kind), in generation order. Do not mutate the returned list."""
        key = (group, kind)
        if key not in self._groups:
            self._groups[key] = [e for e in self.entities.values() if e.group == group and kind in (None, e.kind)]
        return self._groups[key]

    def value(self, e: Entity, fact: str, lang: Lang) -> str:
        """The exact answer string of one fact in one language (numbers are digits in both)."""
        v = e.facts[fact]
        if fact in NUMERIC_FACTS:
            return str(v)
        if fact in RELATION_FACTS:
            return self.entities[v].name[lang]
        return v[0] if lang == "en" else v[1]

    def target(self, e: Entity, fact: str) -> Entity:
        """The entity a relation fact points to."""
        assert fact in RELATION_FACTS, fact
        return self.entities[e.facts[fact]]

    def aliases(self, e: Entity, fact: str, lang: Lang) -> list[str]:
        """Other strings an exact-match grader should accept: the other language's form, '1987年'."""
        main = self.value(e, fact, lang)
        other = self.value(e, fact, "zh" if lang == "en" else "en")
        out = [] if other == main else [other]
        if fact in ("birth_year", "founded"):
            out.append(f"{main}年")
        if fact == "population":
            out.append(f"{int(main):,}")
        return out
