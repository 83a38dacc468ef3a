"""Stored or not answered? Each fact question's cloze in the pretraining text's own wording, against the chat answer.

    .venv/bin/python bench/fact_probe.py runs/NAME [--stages pretrain grpo] [--suites facts_heldout] [--n 300]

For every row of a fact suite (world/eval/SUITE.jsonl) the world keeps a cloze: the start of a statement as
the pretraining text words it ("The population of Kesholhesk is" -> "32500"). *Stored* = a stage's greedy
completion of that cloze starts with the value; *asked* = the same stage's chat answer to the row's question
was graded right by `tinychat eval` (eval/STAGE.json's per-row outcomes, so the speedrun's eval must have run).
The gap between the two is extraction: a fact the model can complete but not answer. Round 8
(docs/speedrun.md) found English held-out facts stored at 76% and answered at 18% this way, and the cause
(the value's space-prefixed BPE id); this script keeps that measurement one command away, per language and
per fact. Prints rates with 95% Wilson intervals; a benchmark, not a test.

*Ranked* = the same statement completed with each candidate value (the row's own and up to 15 other values of
that fact and language in the suite), scored by the stage's log-likelihood of the whole statement; right when
the row's value scores highest. Why both: a greedy cloze completion undercounts Chinese. The regex keeps a run
of Han characters as one pre-token and BPE merges across it ("的爱好是编织" can be one id), so a prompt cut
before the value ends on ids the text never used. Ranking tokenizes each full statement as the text would.
Round 18 (docs/speedrun.md): def0's final model ranks 52.6% of Chinese held-out facts first and completes 44.7%
(English: 82.4% and 66.9%), and answers 28.3% (English 77.0%).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from tinychat.infer.generate import generate
from tinychat.infer.sampling import SamplingParams
from tinychat.model import Model
from tinychat.tokenizer import Tokenizer


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n))


def rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k / n:6.1%} [{lo:.0%}-{hi:.0%}] n={n}" if n else "–"


def load(model_dir: Path) -> tuple[Model, Tokenizer]:
    return Model.from_pretrained(str(model_dir), dtype=torch.float32).eval(), Tokenizer.from_pretrained(model_dir)


def stored(model: Model, tok: Tokenizer, rows: list[dict]) -> list[bool]:
    """Greedy completions of each row's cloze prompt, plain text (no chat template), checked by prefix."""
    params = SamplingParams(temperature=0.0, max_new_tokens=12, seed=0)
    with torch.no_grad():
        outs = generate(model, tok, [r["cloze"]["prompt"] for r in rows], params)
    return [o.text.strip().startswith(r["cloze"]["answer"]) for r, o in zip(rows, outs)]


def ranked(
    model: Model, tok: Tokenizer, rows: list[dict], pool: dict[tuple[str, str], list[str]], k: int = 15
) -> list[bool]:
    """Whether each row's value gives its cloze statement a higher log-likelihood than k other values do."""
    out = []
    with torch.no_grad():
        for i, r in enumerate(rows):
            prompt, answer = r["cloze"]["prompt"], r["cloze"]["answer"]
            others = [v for v in pool[(r["fact"], r["lang"])] if v != answer]
            others = [others[(i * 7 + j) % len(others)] for j in range(min(k, len(others)))]
            sep = " " if r["lang"] == "en" else ""
            head = tok.encode(prompt.rsplit(" ", 1)[0] if sep else prompt[: max(1, len(prompt) // 2)])
            seqs = [tok.encode(prompt + sep + v) for v in [answer, *others]]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # (candidates, width)
            logp = torch.log_softmax(model(ids).float(), -1)  # (candidates, width, vocab)
            start = len(head)  # score from a shared early position: the candidates' ids may differ before the value
            scores = [
                logp[c, start - 1 : len(s) - 1].gather(1, torch.tensor(s[start:])[:, None]).sum().item()
                for c, s in enumerate(seqs)
            ]
            out.append(max(range(len(scores)), key=scores.__getitem__) == 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--stages", nargs="+", default=["pretrain", "grpo"])
    ap.add_argument("--suites", nargs="+", default=["facts_trained", "facts_heldout"])
    ap.add_argument("--n", type=int, default=300, help="the first N rows of each suite (of those, the ones asked)")
    args = ap.parse_args()
    for suite in args.suites:
        rows = [json.loads(line) for line in (args.run / "world" / "eval" / f"{suite}.jsonl").open()]
        rows = [r for r in rows[: args.n] if r.get("cloze")]
        pool: dict[tuple[str, str], list[str]] = defaultdict(list)
        for r in rows:
            if r["cloze"]["answer"] not in pool[(r["fact"], r["lang"])]:
                pool[(r["fact"], r["lang"])].append(r["cloze"]["answer"])
        for stage in args.stages:
            ev = args.run / "eval" / f"{stage}.json"
            if not ev.is_file():
                raise SystemExit(f"{ev} is missing: run the speedrun's eval stage first.")
            outcomes = json.loads(ev.read_text())["suites"][suite]["outcomes"]  # "1" right, "0" wrong, "." not asked
            asked = [(r, o) for r, o in zip(rows, outcomes) if o in "01"]
            n = len(asked)
            model, tok = load(args.run / "checkpoints" / stage)
            got = stored(model, tok, [r for r, _ in asked])
            rank = ranked(model, tok, [r for r, _ in asked], pool)
            groups: dict[str, list[tuple[bool, bool, bool]]] = defaultdict(list)
            for (r, a), s, rk in zip(asked, got, rank):
                for key in ("all", r["lang"], f"{r['lang']} {r['fact']}"):
                    groups[key].append((s, a == "1", rk))
            print(f"\n{suite} · {stage} ({n} rows): stored = cloze completed, ranked = ranked first, asked = chat")
            print(f"{'':<22}{'stored':>28}{'ranked':>28}{'asked':>28}{'asked if stored':>28}")
            for key in sorted(groups, key=lambda k: (k != "all", " " in k, k)):
                rows_ = groups[key]
                k_s, k_a, k_r = (sum(x[i] for x in rows_) for i in range(3))
                k_both = sum(s and a for s, a, _ in rows_)
                line = f"{rate(k_s, len(rows_)):>28}{rate(k_r, len(rows_)):>28}{rate(k_a, len(rows_)):>28}"
                print(f"{key:<22}{line}{rate(k_both, k_s):>28}")


if __name__ == "__main__":
    main()
