"""Which data may mention what: the split rules, the eval reservations, and an audit that checks both.

The rules (docs/world.md explains why):
  * "trained" and "heldout" entities are described in pretraining; only "trained" ones appear in
    SFT, preference and RL data. Relations never cross groups, so a held-out name never appears there.
  * "kb" entities appear only in kb/docs and in the kb_qa / agent eval sets.
  * "ragtrain" entities appear only inside SFT conversations (as documents in context or tool results).
  * "fake_train" names appear only in refusal training (SFT, preference); "fake_eval" names only in eval.
  * Eval items are chosen first and reserved: a question template per trained (entity, fact, language),
    arithmetic expressions, multi-step problems and multi-turn dialogues; training generators skip them.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tinychat.world.entities import rng_for
from tinychat.world.facts import FACTS, LANGS, Entity, World
from tinychat.world.names import SYLLABLES
from tinychat.world.render import n_questions
from tinychat.world.vocab import COMPANY_SUFFIXES

# file family (first path component under the world dir) -> entity groups allowed to appear in it
ALLOWED: dict[str, frozenset[str]] = {
    "pretrain": frozenset({"trained", "heldout"}),
    "sft": frozenset({"trained", "ragtrain", "fake_train"}),
    "preference": frozenset({"trained", "fake_train"}),
    "rl": frozenset({"trained"}),
    "kb": frozenset({"kb"}),
}
TRAIN_FILES = (
    "pretrain/train.jsonl",
    "pretrain/val.jsonl",
    "sft/train.jsonl",
    "sft/val.jsonl",
    "preference/train.jsonl",
    "preference/val.jsonl",
    "rl/train.jsonl",
)


@dataclass
class Reserved:
    """Items that belong to evaluation; every training generator consults this before emitting."""

    template: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (entity, fact, lang) -> template
    arith: set[str] = field(default_factory=set)
    multistep: set[tuple[str, ...]] = field(default_factory=set)
    multiturn: set[tuple[str, ...]] = field(default_factory=set)

    def train_templates(self, eid: str, fact: str, lang: str) -> list[int]:
        held = self.template.get((eid, fact, lang))
        return [i for i in range(n_questions(fact)) if i != held]


def reserve_templates(world: World) -> Reserved:
    """Pick, for every fact of every trained entity and each language, the one question wording eval uses."""
    rng = rng_for(world.seed, "reserve")
    r = Reserved()
    for e in world.group("trained"):
        for f in FACTS[e.kind]:
            for lang in LANGS:
                r.template[(e.id, f, lang)] = rng.randrange(n_questions(f))
    return r


def name_parts(world: World, e: Entity) -> tuple[list[str], list[str]]:
    """The unique parts of e's name: (lower-case English words, Chinese runs), company suffixes left out."""
    en, zh = e.name["en"].split(), e.name["zh"].split("·")
    if e.kind == "company":
        suffix = next(p for p in COMPANY_SUFFIXES if e.name["en"].endswith(" " + p[0]))
        en, zh = en[:-1], [zh[0][: -len(suffix[1])]]
    return [w.lower() for w in en], zh


def mentioned_parts(text: str) -> tuple[set[str], set[str]]:
    """Every candidate name part in a text: English words (lower-case) and maximal runs of name characters.

    Exact because name characters occur in no template or vocabulary (names.py, tested), so a run of them
    is always one whole name part.
    """
    return set(_WORD.findall(text.lower())), set(_ZH_RUN.findall(text))


def file_text(p: Path) -> str:
    """A file's text as a reader sees it: JSONL rows are decoded, so escapes like \\n do not glue words."""
    text = p.read_text(encoding="utf-8")
    if p.suffix != ".jsonl":
        return text
    out: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for line in text.splitlines():
        walk(json.loads(line))
    return "\n".join(out)


_WORD = re.compile(r"[a-z]+")
_ZH_RUN = re.compile("[" + "".join(c for _, c in SYLLABLES) + "]+")


def audit(out_dir: str | Path, world: World) -> list[str]:
    """Problems with a written world: names where their group is not allowed, eval questions in training.

    An empty list means the splits are as promised. Used by generate (a leak is a bug, not a warning)
    and by the tests.
    """
    root = Path(out_dir)
    problems: list[str] = []
    owner: dict[str, str] = {}  # name part (English lower-case or Chinese) -> group
    for e in world.entities.values():
        en, zh = name_parts(world, e)
        for part in en + zh:
            owner[part] = e.group
    for family, allowed in ALLOWED.items():
        files = sorted(p for p in (root / family).rglob("*") if p.is_file() and p.suffix != ".pdf")
        for p in files:
            en, zh = mentioned_parts(file_text(p))
            bad = sorted(x for x in en | zh if x in owner and owner[x] not in allowed)
            if bad:
                problems.append(
                    f"{p.relative_to(root)} mentions {bad[:3]}, whose group ({owner[bad[0]]}) may not "
                    f"appear in {family}/"
                )
    # An eval question leaks if a training user turn starts with it (the question itself, or it plus an
    # instruction; one bisect in the sorted turns), or if its first sentence is a sentence of pretraining text.
    users: list[str] = []
    for f in TRAIN_FILES:
        if f.startswith("pretrain") or not (root / f).exists():
            continue
        for line in (root / f).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for m in row.get("messages", []) + row.get("prompt", []):
                if m["role"] == "user":
                    users.append(m["content"])
    users.sort()
    pretrain: set[str] = set()
    for f in TRAIN_FILES[:2]:
        if (root / f).exists():
            pretrain.update(sentences(file_text(root / f)))
    for p in sorted((root / "eval").glob("*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            first_user = next(m["content"] for m in row["messages"] if m["role"] == "user")
            for q in dict.fromkeys((first_user, row["question"] if row["skill"] != "multiturn" else first_user)):
                i = bisect.bisect_left(users, q)
                if (i < len(users) and users[i].startswith(q)) or sentences(q)[0] in pretrain:
                    problems.append(f"eval question {row['id']} ({q!r}) appears in a training file")
    return problems


_SENT = re.compile(r"[^.?!。？！\n]+[.?!。？！]?")


def sentences(text: str) -> list[str]:
    """Sentences, split after . ? ! and their Chinese forms and at line ends (numbers here have no decimals)."""
    return [s.strip() for s in _SENT.findall(text) if s.strip()] or [text]
