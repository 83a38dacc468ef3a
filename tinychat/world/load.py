"""Reading a generated world back: JSONL rows, eval sets, the entity table, few-shot prompts.

Why here and not in data/: these readers know the tinyworld layout (eval/SKILL.jsonl, world.json); generic
JSONL/Parquet reading for arbitrary datasets belongs to tinychat.data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinychat.errors import UserError
from tinychat.world.evalsets import SKILLS


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p} does not exist.")
    rows = []
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{p} line {i} is not valid JSON: {e.msg}.") from None
    return rows


def load_eval(world_dir: str | Path, skill: str) -> list[dict[str, Any]]:
    """The eval rows of one skill (see evalsets.SKILLS), in their stored (random) order."""
    if skill not in SKILLS:
        raise UserError(f"unknown eval skill {skill!r}; expected one of {', '.join(SKILLS)}.")
    return load_jsonl(Path(world_dir) / "eval" / f"{skill}.jsonl")


def load_world(world_dir: str | Path) -> dict[str, Any]:
    """world.json: entities (with "answers" per fact and language), countries, groups."""
    p = Path(world_dir) / "world.json"
    if not p.is_file():
        raise UserError(f"{p} does not exist; run 'tinychat world generate --out {world_dir}'.")
    return json.loads(p.read_text(encoding="utf-8"))


def chinese_words(world: dict[str, Any]) -> list[str]:
    """Every name and attribute value the world writes in Chinese, sorted: the words its tokenizer keeps whole.

    Why: Chinese text has no spaces, so byte-level BPE fuses a name or value with the characters around
    it, and the same value gets other ids in every sentence (tinychat.tokenizer.train, `--words`). A full
    person name is one word ("塞敦赞·达仁"): its second part always follows the "·", so it tokenizes the same
    way everywhere already. Numbers are left out, since digits are split one by one anyway.
    """
    forms = [c["zh"] for c in world["countries"]]
    for e in world["entities"]:
        forms.append(e["name"]["zh"])
        forms.extend(a["zh"] for a in e.get("answers", {}).values())
    return sorted({f for f in forms if any("\u3400" <= ch <= "\u9fff" for ch in f)})


def few_shot(rows: list[dict[str, Any]], target: dict[str, Any], k: int = 3) -> str:
    """A base-model prompt: k solved examples (same language, other rows) then the target's open question.

    Examples are the first k suitable rows in order, so the prompt is deterministic.
    """
    shots = [r for r in rows if r["id"] != target["id"] and r["lang"] == target["lang"]][:k]
    solved = [
        f"{r['prompt_plain']} {r['answer']}" if r["lang"] == "en" else f"{r['prompt_plain']}{r['answer']}"
        for r in shots
    ]
    return "\n\n".join([*solved, target["prompt_plain"]])
