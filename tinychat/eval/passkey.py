"""The passkey suite: retrieval accuracy of a hidden five-digit key at several context lengths.

    tinychat eval --model DIR --suite passkey --lengths 256,512,1024,2048 --passkey-samples 40

For each length, `samples` prompts of exactly that many tokens (filler trimmed to fit) hide a key at evenly
spread depths (0 = just after the introduction, 1 = just before the question). A row is correct when greedy
decoding reproduces every digit of the key; it is scored with one forward pass over prompt + answer
(greedy output is the answer exactly when every answer token is the argmax after its prefix), so a
2,048-token row costs one prefill, not a decode loop.

Lengths beyond the model's window are run anyway, the window being lifted for the measurement: that is
how "before extension" is measured (a RoPE model has no hard limit, it just meets rotation angles it never
trained on). The default lengths are 1x, 2x, 4x and 8x the trained length: the rope scaling's
original_max_position_embeddings when the model was extended, else its window.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import torch

from tinychat.errors import UserError
from tinychat.world import filler
from tinychat.world.passkey import new_key, prompt


def trained_length(cfg: Any) -> int:
    return int((cfg.rope_scaling or {}).get("original_max_position_embeddings") or cfg.max_seq_len)


def build_rows(tok: Any, length: int, samples: int, seed: int = 0) -> list[dict[str, Any]]:
    """`samples` rows {"ids", "answer", "depth", "key"} whose prompt is at most `length` tokens (as close as
    the sentence granularity allows) including the answer."""
    rows = []
    for i in range(samples):
        rng = random.Random(f"passkey-{seed}-{length}-{i}")
        depth = i / max(samples - 1, 1)
        key = new_key(rng)
        answer = tok.encode(f" {key}")
        sentences: list[str] = []
        budget = length - len(answer)
        ids = tok.encode(prompt(sentences, key, depth))
        if len(ids) > budget:
            raise UserError(f"--lengths {length} is too short for a passkey prompt ({len(ids) + len(answer)} tokens).")
        n_more = max(1, (budget - len(ids)) // 16)  # filler sentences are ~11 tokens: rarely overshoots
        while True:  # add filler until one more sentence would overflow
            more = [filler.sentence("en", rng) for _ in range(n_more)]
            trial = tok.encode(prompt(sentences + more, key, depth))
            if len(trial) <= budget:
                sentences, ids = sentences + more, trial
                n_more = max(1, (budget - len(ids)) // 16)
            elif n_more == 1:
                break
            else:
                n_more //= 2
        rows.append({"ids": ids, "answer": answer, "depth": depth, "key": key})
    return rows


@torch.no_grad()
def score(model: Any, rows: list[dict[str, Any]], batch_size: int, precision: str = "fp32") -> list[bool]:
    """Greedy exact match of each row's answer tokens, by one teacher-forced forward pass per row."""
    device = next(model.parameters()).device
    out: list[bool] = []
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        seqs = [r["ids"] + r["answer"] for r in chunk]
        width = max(map(len, seqs))
        x = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s)  # right padding: causal attention never reads it
        with amp or torch.autocast(device.type, enabled=False):
            logits = model(x.to(device))
        for i, r in enumerate(chunk):
            start = len(r["ids"]) - 1  # the logits that predict the first answer token
            pred = logits[i, start : start + len(r["answer"])].argmax(-1).tolist()
            out.append(pred == r["answer"])
    return out


def run_passkey(
    model: Any,
    tok: Any,
    lengths: list[int] | None = None,
    samples: int = 20,
    batch_size: int = 4,
    precision: str = "fp32",
    seed: int = 0,
) -> dict[str, Any]:
    """{"trained_length", "lengths": {L: {"accuracy", "n", "correct", "ratio", "by_depth"}}, "seconds"}."""
    t0 = time.perf_counter()
    base = trained_length(model.cfg)
    lengths = lengths or [base * m for m in (1, 2, 4, 8)]
    if samples < 1 or any(n < 1 for n in lengths):
        raise UserError("--passkey-samples and every --lengths value must be positive.")
    window = model.cfg
    model.cfg = dataclasses.replace(window, max_seq_len=max(window.max_seq_len, *lengths))  # see the docstring
    try:
        result: dict[str, Any] = {"trained_length": base, "window": window.max_seq_len, "lengths": {}}
        for n in lengths:
            rows = build_rows(tok, n, samples, seed)
            ok = score(model, rows, batch_size, precision)
            thirds: dict[str, list[bool]] = {"start": [], "middle": [], "end": []}
            for r, good in zip(rows, ok):
                thirds[("start", "middle", "end")[min(int(r["depth"] * 3), 2)]].append(good)
            result["lengths"][str(n)] = {
                "accuracy": sum(ok) / len(ok),
                "n": len(ok),
                "correct": sum(ok),
                "ratio": n / base,
                "tokens": max(len(r["ids"]) + len(r["answer"]) for r in rows),
                "by_depth": {k: sum(v) / len(v) for k, v in thirds.items() if v},
            }
    finally:
        model.cfg = window
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def format_passkey(result: dict[str, Any]) -> str:
    lines = [f"passkey (trained length {result['trained_length']}, window {result['window']})"]
    lines.append(f"{'length':>8} {'x':>5} {'acc':>6} {'n':>4}  start/middle/end")
    for n, r in result["lengths"].items():
        depth = "/".join(f"{100 * v:.0f}%" for v in r["by_depth"].values())
        lines.append(f"{n:>8} {r['ratio']:>5.1f} {100 * r['accuracy']:5.1f}% {r['n']:>4}  {depth}")
    return "\n".join(lines)
