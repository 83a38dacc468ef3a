"""Throughput of `tinychat data prepare` and `tinychat data tokenize` on a corpus generated here, one run.

    .venv/bin/python bench/data.py [--mb 32] [--workers 1,2] [--vocab 4096]

The corpus is synthetic web-like text written by this script (nothing is downloaded, tinyworld is not
needed): English paragraphs from a 2,000-word vocabulary with function words at a natural rate and
Chinese paragraphs from 600 common characters, 3:1, 1-8 KB per document, with 5% exact copies, 5% near
copies, 3% short junk and one PII item in 2% of documents, in JSONL shards. For each worker count it
prints MB/s of input text for prepare (all steps on) and for tokenize (the prepared output, with a
BPE tokenizer trained here beforehand; training time is not counted), the ratio to one worker, and the
CPU seconds used (this process plus its finished workers), whose MB per CPU-second stays meaningful
when other jobs share the machine and wall-clock rates do not. Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from tinychat.data.prepare import PrepareConfig, prepare
from tinychat.data.tokenize import TokenizeConfig, tokenize

ZH = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所"
    "民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日"
    "那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想"
    "已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指"
)
_FUNCTION = "the of and to in that for with as it was on by this are from at or have they which were their has"
FUNCTION = _FUNCTION.split()
WIDTHS = (10, 8, 8, 9, 8, 13, 8, 10)
PII = ["mail me at lee.chan@example.com", "call +1 (415) 555-2671", "server 10.20.30.40", "手机13812345678"]


def _vocab(rng: random.Random, n: int) -> list[str]:
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    return ["".join(rng.choices(letters, weights, k=rng.randint(3, 10))) for _ in range(n)]


def en_paragraph(rng: random.Random, vocab: list[str]) -> str:
    sents = []
    for _ in range(rng.randint(3, 7)):
        words = [rng.choice(FUNCTION) if rng.random() < 0.4 else rng.choice(vocab) for _ in range(rng.randint(8, 24))]
        sents.append(" ".join(words).capitalize() + rng.choice(".!?."))
    return " ".join(sents)


def zh_paragraph(rng: random.Random) -> str:
    return "".join(
        "，".join("".join(rng.choices(ZH, k=rng.randint(4, 12))) for _ in range(rng.randint(2, 4)))
        + rng.choice("。！？")
        for _ in range(rng.randint(3, 8))
    )


def generate_corpus(root: Path, mb: float, seed: int = 0) -> int:
    """Write ~mb MB of JSONL shards under root; returns the number of bytes of text."""
    rng = random.Random(seed)
    vocab = _vocab(rng, 2000)
    docs: list[str] = []
    total, shard, n_shard = 0, [], 0
    root.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        nonlocal shard, n_shard
        (root / f"web-{n_shard:04d}.jsonl").write_text(
            "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in shard)
        )
        shard, n_shard = [], n_shard + 1

    while total < mb * 2**20:
        r = rng.random()
        if r < 0.05 and docs:
            text = rng.choice(docs)  # exact copy
        elif r < 0.10 and docs:
            chars = list(rng.choice(docs))  # near copy: two characters changed
            for i in rng.sample(range(len(chars)), 2):
                chars[i] = "x"
            text = "".join(chars)
        elif r < 0.13:
            text = "Home | About | Contact"  # junk
        else:
            target = rng.randint(1000, 8000)
            paras = []
            is_zh = rng.random() < 0.25
            while sum(map(len, paras)) < (target // 3 if is_zh else target):
                paras.append(zh_paragraph(rng) if is_zh else en_paragraph(rng, vocab))
            if rng.random() < 0.02:
                paras.insert(1, rng.choice(PII))
            text = "\n\n".join(paras)
            docs.append(text)
            if len(docs) > 500:
                docs.pop(0)
        shard.append(text)
        total += len(text.encode("utf-8"))
        if len(shard) >= 2000:
            flush()
    if shard:
        flush()
    return total


def cpu_seconds() -> float:
    """User + system time of this process and of its children that have exited (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=32.0, help="MB of generated text")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    from tinychat.data.readers import iter_texts
    from tinychat.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        t0 = time.perf_counter()
        n_bytes = generate_corpus(root / "raw", args.mb)
        secs = time.perf_counter() - t0
        print(f"generated {n_bytes / 2**20:.1f} MB of text in {secs:.1f} s; cpus {os.cpu_count()}")
        texts = iter_texts(root / "raw")
        sample = (t for i, t in zip(range(3000), texts))
        tok = train_tokenizer(sample, args.vocab)
        tok.save_pretrained(root / "tok")
        cols = ("step", "workers", "MB in", "seconds", "MB/s", "vs 1 worker", "CPU s", "MB/CPU-s")
        print("".join(f"{c:<10}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cols, WIDTHS))))
        base: dict[str, float] = {}

        def report(step: str, w: int, n_bytes: int, secs: float, cpu: float) -> None:
            mb = n_bytes / 2**20
            base.setdefault(step, mb / secs)
            print(
                f"{step:<10}{w:>8}{mb:>8.1f}{secs:>9.2f}{mb / secs:>8.2f}{mb / secs / base[step]:>12.2f}x"
                f"{cpu:>8.2f}{mb / cpu:>10.2f}"
            )

        for w in [int(x) for x in args.workers.split(",")]:
            c0 = cpu_seconds()
            st = prepare(PrepareConfig(input=[root / "raw"], out=root / f"prep{w}", workers=w, progress=False))
            report("prepare", w, st["in"]["bytes"], st["elapsed_s"], cpu_seconds() - c0)
            c0 = cpu_seconds()
            tcfg = TokenizeConfig(
                input=[root / f"prep{w}"],
                tokenizer=root / "tok",
                out=root / f"tok{w}",
                workers=w,
                progress=False,
            )
            idx = tokenize(tcfg)
            report("tokenize", w, idx["bytes_in"], idx["elapsed_s"], cpu_seconds() - c0)
        load = os.getloadavg()[0]
        print(f"load average at the end: {load:.1f} (on 2 cores, above ~1 means other jobs were competing)")
        kept, din = st["kept"]["docs"], st["in"]["docs"]
        drops = {k: v["docs"] for k, v in st["dropped"].items() if v["docs"]}
        print(
            f"prepare kept {kept:,} of {din:,} documents; dropped {drops}; "
            f"tokenize: {idx['tokens']:,} tokens, {idx['bytes_per_token']:.2f} bytes/token"
        )


if __name__ == "__main__":
    main()
