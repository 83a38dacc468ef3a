"""Drills: pure chat rows of one skill each, for a short stage of their own between pretraining and SFT.

Why (docs/speedrun.md, rounds 5, 23, 24, 26 and 27): some skills the tiny model learns only from many optimizer steps
on *undiluted* examples. Mixed into pretraining or SFT they stay at 0-2% for the whole budget; alone, from
the pretrained base, at lr 1e-3:
- arithmetic: easy sums answered with the bare number take off after ~900 steps (82% at 1,336); worked by
  columns (arith.worked) they reach 71% at 250 steps and 86% at 400 (round 25);
- calculator calls (copy the question's numbers into the call, then the tool's result into the answer) are
  right in 100 of 100 after 100-300 steps;
- reading (answer from a passage in the prompt) takes off after 300-500 steps when each row shows one chunk as
  the knowledge base retrieves it and asks up to 8 questions about it (round 26: kb_qa 0% -> 56% in a whole run);
- the agent (search by name, read the value, calculate) copies nothing in 400 steps alone and reaches 48% in
  300 after the reading drill, so it is drilled with reading (round 27);
- multistep: the world's own word problems solved step by step. The model recalls each fact in the first
  sentence, then copies the wrong operand into the columns ("born in 1948. 1948 - 1948: ..."), so the numeric
  kinds stayed at 1 in 79; 150 drill steps take them to 48 in 79 (round 31).
A drill erases what the model knew (it answers everything as a drill), so the speedrun follows it with an
anneal: pretraining's own mix with the drill rows kept in it, which restores the facts and keeps the drill.

Every row is a chat row (messages, tools?, skill, lang) as `tinychat sft --data` reads it:
- arithmetic: easy problems (tinychat.world.arith) answered by columns, then the number (the SFT rows' form);
- calculator: hard problems through the calculator tool, the SFT's own arithmetic_tool format;
- reading: one knowledge-base chunk about the entities of *other* worlds (seeds no run uses), so no answer can
  come from memory, and several questions about it; a sixth of the rows show no passage and refuse. Names that
  happen to equal one of this world's are dropped with their rows;
- agent: the SFT's agent conversations (sft.agent_turns) over other worlds' entities and documents, likewise;
- multistep: problems over the run's *own* trained entities, since what is drilled is composing facts the model
  stores, in the SFT's two forms: the worked solution (multistep.Problem.cot), or its steps in a <think> block
  and then the answer alone. Problems are drawn afresh, so most are not among the SFT's 400;
- instruction: the trained entities' facts asked with an instruction (capitals, the other language), answered as
  the SFT's instruction rows are, for the anneal's mix (round 34).
No problem of the world's eval sets appears in any row (multistep's: no eval question is asked).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.world import arith, multistep
from tinychat.world.entities import build_world
from tinychat.world.evalsets import SEARCH_K, instruction_kinds, join_q, search_tool
from tinychat.world.facts import FACTS, LANGS, Entity, Lang, World
from tinychat.world.kb import KbDoc, build_docs, stated
from tinychat.world.load import load_jsonl, load_world
from tinychat.world.messages import assistant, system, user
from tinychat.world.render import LANG, question
from tinychat.world.sft import (
    RAG_NO_ANSWER,
    RAG_SYSTEM,
    agent_turns,
    calculator_turns,
    chat,
    instruction_turns,
    multistep_cot_turns,
    multistep_direct_turns,
    worked_answer,
)
from tinychat.world.splits import reserve_templates

KINDS = ("arithmetic", "calculator", "reading", "agent", "multistep", "instruction")
INSTRUCTION_KINDS = ("upper", "lang")  # the instructions the instruction drill asks by default (round 34)
FRESH_SEED = 1_000_003  # the other worlds' seeds start here, far from any seed a run would use
NO_PASSAGE = 0.12  # draws of a row with no passage (~1 row in 6, as passage rows are redrawn more): refused names
VAL_WORLDS = 100_000  # reading's validation rows come from worlds this far past the training rows' first
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


def multistep_rows(
    rng: random.Random,
    world_dir: Path,
    n: int,
    direct: float = 0.5,
    kinds: tuple[str, ...] = multistep.KINDS,
    langs: tuple[Lang, ...] = LANGS,
) -> list[dict[str, Any]]:
    """Up to n distinct word problems over the trained entities of the world at world_dir, a share `direct` of
    them asked for the answer and answered with the steps in a <think> block, then the answer alone, the rest
    asked with a "think step by step" suffix and answered with the worked solution (the SFT's two forms). A
    problem whose question the multistep eval set asks (in either language, with the eval's suffix) is skipped;
    fewer than n come back when the world has fewer problems (a small world has ~25,000: pairs of people and
    ages). `kinds` and `langs` narrow the draw (bench/anneal_mix.py's variants)."""
    w = load_world(world_dir)
    world = build_world(w["seed"], w["size"])
    asked = {r["question"] for r in load_jsonl(world_dir / "eval" / "multistep.jsonl")}
    out = []
    for p in multistep.sample(world, "trained", rng, n + len(asked), set(), kinds):
        if any(join_q(p.question[g], LANG[g].COT_SUFFIX[0], g) in asked for g in LANGS):
            continue
        lang = rng.choice(langs)
        turns = multistep_direct_turns if rng.random() < direct else multistep_cot_turns
        out.append(chat(turns(p, lang, rng), "multistep_drill", lang))
        if len(out) == n:
            break
    return out


def instruction_rows(
    rng: random.Random, world_dir: Path, n: int, kinds: tuple[str, ...] = INSTRUCTION_KINDS
) -> list[dict[str, Any]]:
    """n questions about the trained entities' facts with a format or language instruction of `kinds` (the
    eval's instruction kinds: upper, lang, json, sentence, number_only, one_word), asked in a training wording
    and answered as the SFT's instruction rows answer (sft.instruction_turns). No (entity, fact, instruction) that
    the instruction eval set asks is drawn, in either language; each (entity, fact, language, instruction,
    wording) at most once until all have been. Why capitals and the other language: a model answers each from a
    fact it knows in one form, and must write that value in another (MECHANIC for mechanic, 伦锡亚 for Lensimia).
    Every round 33 final model answered 0-1 of 23-32 capitals questions and 4 of 42-53 cross-language ones, with 32
    and ~110 SFT rows of each; the values are the world's closed lists and entity names, so they are seen again
    and again under other entities' facts (docs/speedrun.md, round 34)."""
    w = load_world(world_dir)
    world = build_world(w["seed"], w["size"])
    res = reserve_templates(world)
    asked = {(r["entity"], r["fact"], r["instruction"]) for r in load_jsonl(world_dir / "eval" / "instruction.jsonl")}
    cands = [
        (e, f, lang, k, t)
        for e in world.group("trained")
        for f in FACTS[e.kind]
        for lang in LANGS
        for k in instruction_kinds(world, e, f, lang)
        if k in kinds and (e.id, f, k) not in asked
        for t in res.train_templates(e.id, f, lang)
    ]
    out: list[dict[str, Any]] = []
    while cands and len(out) < n:  # distinct draws, pass after pass
        for e, f, lang, k, t in rng.sample(cands, min(len(cands), n - len(out))):
            q = question(world, e, f, lang, t)
            out.append(chat(instruction_turns(world, e, f, lang, k, q), "instruction_drill", lang))
    return out


def reading(
    rng: random.Random, n: int, taken: set[str], size: str = "small", turns: int = 8, first_seed: int = FRESH_SEED
) -> list[dict[str, Any]]:
    """n reading rows over fresh worlds' documents. A row shows ONE passage exactly as the knowledge base
    shows a retrieved chunk (KbDoc.chunks, "[1] source: PATH"), then asks up to `turns` questions about it:
    facts the passage states, answered with the value, and one question in twelve about a fact its document
    does not state, answered with the refusal the SFT rows teach. Why one passage and many questions (round
    26): each question is a supervised copy for the price of one passage, and with one passage the skill is
    finding the value, not also choosing among documents; the speedrun then prompts with the top-1 chunk.
    About one row in six (NO_PASSAGE) shows no passage and asks about names of that world, refused as the SFT
    refuses unknown names: without them the drill taught the model to answer about any name, and refusal of
    non-existent entities fell from 99% to 36% (round 26).
    `taken`: names of the run's world; a row that mentions one is dropped."""
    out: list[dict[str, Any]] = []
    for w, docs, clash in _fresh_worlds(first_seed, size, taken):
        if len(out) == n:
            break
        ents = [e for g in GROUPS for e in w.group(g)]
        for _ in range(len(docs)):
            if len(out) == n:
                break
            if rng.random() < NO_PASSAGE:  # the contract's other half: no passage, no answer
                row: dict[str, Any] | None = _unseen_row(rng, w, ents, turns // 2)
            else:
                row = _passage_row(rng, w, docs, ents, turns)
            if _clean(row, clash):
                out.append(row)
    return out


def _fresh_worlds(first_seed: int, size: str, taken: set[str]) -> Iterator[tuple[World, list[KbDoc], list[str]]]:
    """Other worlds from first_seed on, each with its knowledge-base documents over every group and the names it
    shares with the run's world (`taken`)."""
    seed = first_seed
    while True:
        w = build_world(seed, size)
        seed += 1
        docs = [d for g in GROUPS for d in build_docs(w, g, random.Random(seed))]
        yield w, docs, [nm for e in w.entities.values() for nm in e.name.values() if nm in taken]


def _clean(row: dict[str, Any] | None, clash: list[str]) -> bool:
    """A row to keep: one was made, and it mentions none of the run's own names."""
    return row is not None and not any(nm in json.dumps(row, ensure_ascii=False) for nm in clash)


def _ask(rng: random.Random, w: World, e: Entity, f: str, lang: Lang) -> dict[str, str]:
    """The user turn asking fact f of e, in one of the world's question templates."""
    return user(question(w, e, f, lang, rng.randrange(len(LANG[lang].QUESTIONS[f]))))


def _unseen_row(rng: random.Random, w: World, ents: list[Entity], turns: int) -> dict[str, Any]:
    """No passage, and `turns` questions about names of a world the model never saw, each refused."""
    lang = rng.choice(LANGS)
    msgs = []
    for e in rng.sample(ents, min(turns, len(ents))):
        msgs += [
            _ask(rng, w, e, rng.choice(FACTS[e.kind]), lang),
            assistant(rng.choice(LANG[lang].REFUSALS).format(n=e.name[lang])),
        ]
    return chat(msgs, "reading_drill", lang)


def _passage_row(
    rng: random.Random, w: World, docs: list[KbDoc], ents: list[Entity], turns: int
) -> dict[str, Any] | None:
    """One chunk of a random document and up to `turns` questions about it (None: the chunk states nothing)."""
    d = rng.choice(docs)
    chunk = rng.choice(d.chunks)
    todo = stated(w, d, chunk)
    if not todo:
        return None
    rng.shuffle(todo)
    msgs = [system(f"{RAG_SYSTEM[d.lang]}\n\n[1] source: {d.path}\n{chunk}")]
    for _turn in range(min(turns, len(todo))):
        if rng.random() < 1 / 12:  # a fact the document does not state: the refusal
            e = rng.choice(ents)
            f = rng.choice(FACTS[e.kind])
            if (e.id, f) in d.states:
                continue
            a = RAG_NO_ANSWER[d.lang]
        else:
            e, f = todo.pop()
            a = w.value(e, f, d.lang)
        msgs += [_ask(rng, w, e, f, d.lang), assistant(a)]
    return chat(msgs, "reading_drill", d.lang)


def agent(
    rng: random.Random, n: int, taken: set[str], size: str = "small", first_seed: int = FRESH_SEED, k: int = SEARCH_K
) -> list[dict[str, Any]]:
    """n agent rows over fresh worlds' entities: a word problem over facts of two or three entities (the agent
    eval's kinds) solved with the search and calculator tools as SFT's agent rows solve it (sft.agent_turns).
    `taken` as in `reading`; k: passages a search returns (the tool's schema says so too)."""
    out: list[dict[str, Any]] = []
    for w, docs, clash in _fresh_worlds(first_seed, size, taken):
        if len(out) == n:
            break
        for g in GROUPS:
            per = max(1, len(w.group(g)) // 2)
            for p in multistep.sample(w, g, rng, per, set(), kinds=multistep.NUMERIC_KINDS):
                if len(out) == n:
                    break
                lang, msgs = agent_turns(rng, w, docs, p, rng.choice(LANGS), k)
                row = chat(msgs, "agent_drill", lang, [search_tool(k), arith.CALCULATOR_TOOL]) if msgs else None
                if _clean(row, clash):
                    out.append(row)
    return out


def build(
    world_dir: Path, counts: dict[str, int], val: int, seed: int = 0, multistep_direct: float = 0.5
) -> tuple[list[dict], list[dict]]:
    """(train, val) drill rows of the world at world_dir: counts[kind] training rows of each kind, and `val`
    rows of each kind with a count held out for validation; shuffled together. `multistep_direct`: see
    multistep_rows."""
    unknown = sorted(set(counts) - set(KINDS))
    if unknown:
        raise UserError(f"unknown drill kind {unknown[0]!r}; kinds are {', '.join(KINDS)}.")
    if any(n < 0 for n in counts.values()) or val < 0:
        raise UserError("drill row counts must be >= 0.")
    if not 0 <= multistep_direct <= 1:
        raise UserError(f"--multistep_direct is a share between 0 and 1, got {multistep_direct}.")
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
        if kind in ("reading", "agent"):  # validation from worlds of their own: a passage is never in both splits
            make = reading if kind == "reading" else agent
            held += make(rng, val, taken, size, first_seed=FRESH_SEED + VAL_WORLDS)
            train += make(rng, n, taken, size)
            continue
        if kind == "multistep":
            rows = multistep_rows(rng, world_dir, n + val, multistep_direct)
        elif kind == "instruction":
            rows = instruction_rows(rng, world_dir, n + val)
        else:
            rows = (arithmetic if kind == "arithmetic" else calculator)(rng, exclude, n + val, seen)
        held += rows[:val]  # one draw, split: a row is never in both
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
        "(easy sums worked by columns), calculator (hard problems through the tool), reading (questions answered "
        "from documents about other worlds' entities), agent (search and calculate over other worlds), multistep "
        "(the world's own word problems solved step by step), instruction (its facts asked in capitals or the other "
        "language)",
    )
    val: int = field(32, help="validation rows per kind (not trained on)")
    seed: int = field(0, help="random seed")
    multistep_direct: float = field(
        0.5,
        help="share of the multistep rows asked for the answer alone (its steps thought in a <think> block); the "
        "rest are asked step by step and answered with the worked solution",
    )


def write(cfg: DrillsConfig) -> dict[str, Any]:
    if not cfg.world or not cfg.out:
        raise UserError("world drills needs --world DIR and --out DIR.")
    if not sum(cfg.rows.values()):
        raise UserError("no drill rows asked for; give --rows a count per kind, e.g. '{calculator = 3000}'.")
    train, val = build(Path(cfg.world), cfg.rows, cfg.val, cfg.seed, cfg.multistep_direct)
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
