"""A text corpus that needs no download: the Python sources of packages installed here, as {"text"} rows.

    .venv/bin/python bench/code_corpus.py --out /tmp/s21/code.jsonl [--max-bytes 8000000]

Why: tinyworld is a small world stated many times, so a scaling sweep on it measures template learning and
memorisation, not a power law (docs/scaling.md). Source code is varied, plentiful on any machine with a
virtual environment, and follows the usual laws. Files are shuffled with a fixed seed, de-duplicated by
content, and kept between 500 bytes and 200 kB; the same venv gives the same corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sysconfig
from pathlib import Path

PACKAGES = ("torch", "transformers", "numpy", "scipy", "sympy", "pandas", "networkx", "jinja2", "tokenizers",
            "safetensors", "huggingface_hub", "peft")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-bytes", type=int, default=8_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = Path(sysconfig.get_paths()["purelib"])
    files = [f for pkg in PACKAGES if (root / pkg).is_dir() for f in sorted((root / pkg).rglob("*.py"))]
    random.Random(args.seed).shuffle(files)
    seen: set[str] = set()
    rows, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.md5(text.encode()).hexdigest()
        if not 500 <= len(text) <= 200_000 or digest in seen:
            continue
        seen.add(digest)
        rows.append(text)
        total += len(text)
        if total > args.max_bytes:
            break
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    print(f"wrote {out}: {len(rows)} files, {total:,} characters")


if __name__ == "__main__":
    main()
