"""Small readers shared by the tinyworld tests (a uniquely named module, so no clash with other test folders)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from tinychat.world import load_world


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def strings(x: object) -> list[str]:
    """Every string inside a decoded JSON value."""
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [s for v in x.values() for s in strings(v)]
    if isinstance(x, list):
        return [s for v in x for s in strings(v)]
    return []


def decoded_text(path: Path) -> str:
    """A file's text with JSONL rows decoded (so a name is never hidden behind an escape such as \\n)."""
    if path.suffix == ".jsonl":
        return "\n".join(s for row in read_jsonl(path) for s in strings(row))
    return path.read_text(encoding="utf-8")


def names(world_dir: Path, group: str) -> list[tuple[str, str]]:
    """(English, Chinese) names of a group, read from the world's own world.json."""
    return [(e["name"]["en"], e["name"]["zh"]) for e in load_world(world_dir)["entities"] if e["group"] == group]


@functools.lru_cache(maxsize=16)
def _lower(text: str) -> str:
    return text.lower()


def mentions(text: str, en: str, zh: str) -> bool:
    """Whether a text names an entity: English as a whole word (any case), Chinese as a substring."""
    if zh in text:
        return True
    low = _lower(text)
    if en.lower() not in low:  # fast path; the regex only confirms word boundaries
        return False
    return re.search(rf"(?<![a-z]){re.escape(en.lower())}(?![a-z])", low) is not None
