"""The split promises, checked by brute force (plain substring search), independently of splits.audit."""

from __future__ import annotations

import bisect
import re
from pathlib import Path

import pytest
from world_helpers import decoded_text, mentions, names, read_jsonl

from tinychat.world import load_manifest
from tinychat.world.entities import build_world
from tinychat.world.splits import audit

TRAIN = (
    "pretrain/train.jsonl",
    "pretrain/val.jsonl",
    "sft/train.jsonl",
    "sft/val.jsonl",
    "preference/train.jsonl",
    "preference/val.jsonl",
    "rl/train.jsonl",
)
POST = TRAIN[2:]


def _texts(world_dir: Path, rels: tuple[str, ...]) -> dict[str, str]:
    return {r: decoded_text(world_dir / r) for r in rels}


def _other_files(world_dir: Path, allowed_prefixes: tuple[str, ...]) -> list[Path]:
    return [
        p
        for p in sorted(world_dir.rglob("*"))
        if p.is_file() and p.suffix != ".pdf" and not str(p.relative_to(world_dir)).startswith(allowed_prefixes)
    ]


@pytest.fixture(params=["micro_dir", "small_dir"])
def world_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def test_audit_is_clean(world_dir: Path) -> None:
    m = load_manifest(world_dir)
    assert audit(world_dir, build_world(m.seed, m.size)) == []


def test_kb_entities_appear_in_no_training_file(world_dir: Path) -> None:
    texts = _texts(world_dir, TRAIN)
    for en, zh in names(world_dir, "kb"):
        for rel, text in texts.items():
            assert not mentions(text, en, zh), (en, zh, rel)


def test_kb_documents_mention_only_kb_entities(micro_dir: Path) -> None:
    docs = [p for p in (micro_dir / "kb").rglob("*") if p.is_file() and p.suffix != ".pdf"]
    text = "\n".join(p.read_text(encoding="utf-8") for p in docs)
    for group in ("trained", "heldout", "ragtrain", "fake_train", "fake_eval"):
        for en, zh in names(micro_dir, group):
            assert not mentions(text, en, zh), (group, en)
    for en, zh in names(micro_dir, "kb"):
        assert mentions(text, en, zh), en  # every kb entity has a document


def test_heldout_entities_never_reach_post_training(world_dir: Path) -> None:
    pre, post = _texts(world_dir, TRAIN[:1]), _texts(world_dir, POST)
    for en, zh in names(world_dir, "heldout"):
        assert mentions(pre["pretrain/train.jsonl"], en, zh), en  # ...but they are in pretraining
        for rel, text in post.items():
            assert not mentions(text, en, zh), (en, rel)


def test_ragtrain_entities_only_in_sft(world_dir: Path) -> None:
    for p in _other_files(world_dir, ("sft/",)):
        if p.name == "world.json":
            continue
        text = decoded_text(p)
        for en, zh in names(world_dir, "ragtrain"):
            assert not mentions(text, en, zh), (en, p)


def test_fake_names_appear_only_where_promised(world_dir: Path) -> None:
    """Refusal-training fakes only in SFT/preference; eval fakes only in eval/refusal.jsonl."""
    for p in _other_files(world_dir, ("sft/", "preference/")):
        if p.name == "world.json":
            continue
        text = decoded_text(p)
        for en, zh in names(world_dir, "fake_train"):
            assert not mentions(text, en, zh), (en, p)
    for p in _other_files(world_dir, ("eval/refusal.jsonl",)):
        if p.name == "world.json":
            continue
        text = decoded_text(p)
        for en, zh in names(world_dir, "fake_eval"):
            assert not mentions(text, en, zh), (en, p)


def _user_turns(world_dir: Path) -> list[str]:
    out = []
    for rel in POST:
        for row in read_jsonl(world_dir / rel):
            out += [m["content"] for m in row.get("messages", []) + row.get("prompt", []) if m["role"] == "user"]
    return out


def test_eval_questions_are_not_in_training(world_dir: Path) -> None:
    users = sorted(_user_turns(world_dir))
    pretrain = decoded_text(world_dir / "pretrain/train.jsonl") + decoded_text(world_dir / "pretrain/val.jsonl")
    for p in sorted((world_dir / "eval").glob("*.jsonl")):
        for row in read_jsonl(p):
            first = next(m["content"] for m in row["messages"] if m["role"] == "user")
            for q in {first, row["question"] if row["skill"] != "multiturn" else first}:
                i = bisect.bisect_left(users, q)  # users is sorted: turns starting with q come right at i
                assert i == len(users) or not users[i].startswith(q), (row["id"], q)
                assert q not in pretrain, (row["id"], q)


_OPS = {
    "+": "+",
    "-": "-",
    "*": "*",
    "×": "*",
    "/": "/",
    "÷": "/",
    "plus": "+",
    "minus": "-",
    "times": "*",
    "divided by": "/",
    "加": "+",
    "减": "-",
    "乘以": "*",
    "除以": "/",
}
# two-operand expressions, not parts of a parenthesised compound like "(12 + 7) * 3"
_EXPR = re.compile(r"(?<![\d(])(\d+)\s*(\+|-|\*|×|/|÷|plus|minus|times|divided by|加|减|乘以|除以)\s*(\d+)(?![\d)])")
_SUM = re.compile(r"sum of (\d+) and (\d+)")


def _canon(text: str) -> set[str]:
    """Canonical 'a op b' expressions stated anywhere in a text, whatever the wording."""
    out = {f"{a} {_OPS[op]} {b}" for a, op, b in _EXPR.findall(text)}
    return out | {f"{a} + {b}" for a, b in _SUM.findall(text)}


def test_eval_arithmetic_is_never_trained(world_dir: Path) -> None:
    seen: set[str] = set()
    for rel in TRAIN:
        seen |= _canon(decoded_text(world_dir / rel))
    for skill in ("arithmetic", "arithmetic_tool"):
        for row in read_jsonl(world_dir / "eval" / f"{skill}.jsonl"):
            if "(" not in row["expression"]:
                assert row["expression"] in _canon(row["question"]), row["question"]  # the parser sees it
            assert row["expression"] not in seen, row["expression"]


def test_multistep_and_multiturn_items_are_not_trained(micro_dir: Path) -> None:
    users = set(_user_turns(micro_dir))
    for row in read_jsonl(micro_dir / "eval/multistep.jsonl"):
        bare = row["question"].rsplit("?", 1)[0] + "?" if row["lang"] == "en" else row["question"].split("？")[0] + "？"
        assert not any(u.startswith(bare) for u in users), bare
    post = "\n".join(decoded_text(micro_dir / r) for r in POST)
    for row in read_jsonl(micro_dir / "eval/multiturn.jsonl"):
        assert row["messages"][0]["content"] not in post
