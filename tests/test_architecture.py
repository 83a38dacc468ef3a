"""Imports flow one way (docs/architecture.md): a tinychat package imports only packages to its left."""

from __future__ import annotations

import re
from pathlib import Path

import tinychat

ORDER = "config errors device world data tokenizer model infer train rag serve agent eval".split()
SAME_LEVEL = {"config", "errors", "device"}
SEAMS = {  # documented: loads a tokenizer / chat model lazily at the seam
    ("data/tokenize.py", "tokenizer"),
    ("data/convert.py", "tokenizer"),
    ("data/self_instruct.py", "infer"),
}


def test_imports_only_flow_left() -> None:
    root = Path(tinychat.__file__).parent
    rank = {n: i for i, n in enumerate(ORDER)}
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        me = rel.parts[0].removesuffix(".py")
        if me not in rank:
            continue
        for m in re.finditer(r"^\s*(?:from|import)\s+tinychat\.(\w+)", path.read_text(encoding="utf-8"), re.M):
            dep = m.group(1)
            if dep not in rank or (me in SAME_LEVEL and dep in SAME_LEVEL) or (rel.as_posix(), dep) in SEAMS:
                continue
            if rank[dep] > rank[me]:
                bad.append(f"{rel.as_posix()} imports tinychat.{dep}")
    assert not bad, "imports against the architecture order:\n" + "\n".join(bad)
