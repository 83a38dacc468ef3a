"""Drills: pure chat rows of one skill each, for a short stage of their own between pretraining and SFT.

Why (docs/speedrun.md, rounds 5, 23 and 24): some skills the tiny model learns only from many optimizer steps
on *undiluted* examples. Mixed into pretraining or SFT they stay at 0-2% for the whole budget; alone, from
the pretrained base, at lr 1e-3:
- arithmetic: easy sums answered with the bare number take off after ~900 steps (82% at 1,336); worked by
  columns (arith.worked) they reach 71% at 250 steps and 86% at 400 (round 25);
- calculator calls (copy the question's numbers into the call, then the tool's result into the answer) are
  right in 100 of 100 after 100-300 steps;
- reading (answer from the documents in the prompt) learns slowly.
A drill erases what the model knew (it answers everything as a drill), so the speedrun follows it with an
anneal: pretraining's own mix with the drill rows kept in it, which restores the facts and keeps the drill.

Every row is a chat row (messages, tools?, skill, lang) as `tinychat sft --data` reads it:
- arithmetic: easy problems (tinychat.world.arith) answered by columns, then the number (the SFT rows' form);
- calculator: hard problems through the calculator tool, the SFT's own arithmetic_tool format;
- reading: the SFT's document-reading rows, but about the entities of *other* worlds (seeds no run uses), so
  no answer can come from memory: only reading the documents gives it. Names that happen to equal one of
  this world's are dropped with their rows.
No problem of the world's eval sets appears in any row.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.world import arith
from tinychat.world.entities import build_world
from tinychat.world.facts import FACTS, LANGS
from tinychat.world.kb import build_docs, passage
from tinychat.world.load import load_jsonl, load_world
from tinychat.world.messages import assistant, system, user
from tinychat.world.render import LANG, question
from tinychat.world.sft import RAG_NO_ANSWER, RAG_SYSTEM, calculator_turns, chat, worked_answer

KINDS = ("arithmetic", "calculator", "reading")
FRESH_SEED = 1_000_003  # the other worlds' seeds start here, far from any seed a run would use
GROUPS = ("trained", "heldout", "kb", "ragtrain")


def held_out(world_dir: Path) -> set[str]:
    """Every arithmetic expression the world's eval sets ask: none may be drilled."""
    keys: set[str] = set()
    for name in ("arithmetic", "arithmetic_tool"):
        keys |= {r["expression"] for r in load_jsonl(world_dir / "eval" / f"{name}.jsonl") if r.get("expression")}
    return keys


def arithmetic(rng: random.Random, exclude: set[str], n: int, seen: set[str]) -> list[dict[str, Any]]:
    """n distinct easy problems (none in exclude or seen; seen records them), asked and answered by columns."""
    out = []
    for p in arith.sample(rng, "easy", exclude, n, seen):
        lang = rng.choice(LANGS)
        out.append(
            chat([user(arith.question(p, lang, rng)), assistant(worked_answer(p, lang))], "arithmetic_drill", lang)
        )
    return out


def calculator(rng: random.Random, exclude: set[str], n: int, seen: set[str]) -> list[dict[str, Any]]:
    """n distinct hard problems through the calculator: the call, its result, the answer."""
    out = []
    for p in arith.sample(rng, "hard", exclude, n, seen):
        lang = rng.choice(LANGS)
        out.append(chat(calculator_turns(p, lang, rng), "calculator_drill", lang, [arith.CALCULATOR_TOOL]))
    return out


def reading(rng: random.Random, n: int, taken: set[str], size: str = "small") -> list[dict[str, Any]]:
    """n reading rows over fresh worlds' entities: 1-3 documents, the question, the value (or, for 15% of
    rows whose documents do not state it, the refusal the SFT rows teach). `taken`: names of the run's
    world; a row that mentions one is dropped."""
    out: list[dict[str, Any]] = []
    seed = FRESH_SEED
    while len(out) < n:
        w = build_world(seed, size)
        seed += 1
        docs = [d for g in GROUPS for d in build_docs(w, g, random.Random(seed))]
        clash = [nm for e in w.entities.values() for nm in e.name.values() if nm in taken]
        pools = {lang: [d for d in docs if d.lang == lang] for lang in LANGS}
        ents = [e for g in GROUPS for e in w.group(g)]
        for _ in range(len(ents) * 2):
            if len(out) == n:
                break
            e, lang = rng.choice(ents), rng.choice(LANGS)
            f = rng.choice(FACTS[e.kind])
            stating = [d for d in pools[lang] if (e.id, f) in d.states]
            if not stating:
                continue  # this entity's documents are in the other language only
            answerable = rng.random() < 0.85
            pool = rng.sample(pools[lang], min(6, len(pools[lang])))
            others = [d for d in pool if (e.id, f) not in d.states][: rng.randint(1, 2)]
            ctx = ([rng.choice(stating)] if answerable else []) + others
            rng.shuffle(ctx)
            docs_text = "\n\n".join(f"[{i + 1}] {passage(d)}" for i, d in enumerate(ctx))
            q = question(w, e, f, lang, rng.randrange(len(LANG[lang].QUESTIONS[f])))
            a = w.value(e, f, lang) if answerable else RAG_NO_ANSWER[lang]
            row = chat([system(f"{RAG_SYSTEM[lang]}\n\n{docs_text}"), user(q), assistant(a)], "reading_drill", lang)
            if clash and any(nm in json.dumps(row, ensure_ascii=False) for nm in clash):
                continue
            out.append(row)
    return out


def build(world_dir: Path, counts: dict[str, int], val: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, val) drill rows of the world at world_dir: counts[kind] training rows of each kind, and `val`
    rows of each kind with a count held out for validation; shuffled together."""
    unknown = sorted(set(counts) - set(KINDS))
    if unknown:
        raise UserError(f"unknown drill kind {unknown[0]!r}; kinds are {', '.join(KINDS)}.")
    if any(n < 0 for n in counts.values()) or val < 0:
        raise UserError("drill row counts must be >= 0.")
    if not (world_dir / "eval").is_dir():
        raise UserError(f"{world_dir} is not a tinyworld directory (no eval/); run 'tinychat world generate' first.")
    rng = random.Random(seed)
    exclude, seen = held_out(world_dir), set()
    w = load_world(world_dir)
    taken = {nm for e in w["entities"] for nm in e["name"].values()}
    size = w["size"] if w["size"] != "medium" else "small"
    train: list[dict] = []
    held: list[dict] = []
    for kind in KINDS:
        n = counts.get(kind, 0)
        if not n:
            continue
        if kind == "reading":
            rows = reading(rng, n + val, taken, size)
        else:
            rows = (arithmetic if kind == "arithmetic" else calculator)(rng, exclude, n + val, seen)
        held += rows[:val]
        train += rows[val:]
    rng.shuffle(train)
    return train, held


@dataclass
class DrillsConfig:
    """Options of `tinychat world drills`."""

    world: str = field("", help="the tinyworld directory whose eval sets the drills must not touch")
    out: str = field("", help="directory for train.jsonl and val.jsonl (chat rows for `tinychat sft --data`)")
    rows: dict[str, int] = field(
        {},
        help="training rows per kind, a TOML table such as '{calculator = 3000, arithmetic = 14000}': arithmetic "
        "(easy sums answered directly), calculator (hard problems through the tool), reading (questions answered "
        "from documents about other worlds' entities)",
    )
    val: int = field(32, help="validation rows per kind (not trained on)")
    seed: int = field(0, help="random seed")


def write(cfg: DrillsConfig) -> dict[str, Any]:
    if not cfg.world or not cfg.out:
        raise UserError("world drills needs --world DIR and --out DIR.")
    if not sum(cfg.rows.values()):
        raise UserError("no drill rows asked for; give --rows a count per kind, e.g. '{calculator = 3000}'.")
    train, val = build(Path(cfg.world), cfg.rows, cfg.val, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")
    info = {"counts": dict(cfg.rows), "val_per_kind": cfg.val, "seed": cfg.seed, "train_rows": len(train)}
    (out / "drills.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def run(cfg: DrillsConfig) -> int:
    t0 = time.perf_counter()
    info = write(cfg)
    parts = ", ".join(f"{k} {n}" for k, n in info["counts"].items() if n)
    print(f"wrote {info['train_rows']} drill rows ({parts}) to {cfg.out} in {time.perf_counter() - t0:.1f}s")
    return 0
