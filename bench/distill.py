"""Distillation against cross-entropy at equal wall-clock (issue 15; docs/compress.md, "Distillation").

    python bench/distill.py runs/NAME [--steps 886] [--alphas 0.5] [--topk 32] [--out /tmp/distill_bench]
    python bench/distill.py runs/NAME --step-time-only

The teacher is RUN's pretrained model (RUN/checkpoints/pretrain), the data its token shards, the student a
1M-parameter model of the same vocabulary (d_model 96, 2 layers; docs/compress.md's). Two parts:

1. Step time, side by side: one optimiser step of the student on a random batch with plain cross-entropy
   (the fused head), with the cached top-k KL through the fused head, and with it on the (B, T, V) logits
   (the path before the fused one), in interleaved rounds; medians and ratios to cross-entropy.
2. Runs: for each alpha, `tinychat distill --kd_topk K` for --steps steps, then `tinychat pretrain` of the same
   student for the same wall-clock (the teacher's cache plus the distillation's training time), and once
   `tinychat pretrain` for --steps steps (equal steps). Sequential, so run it on an idle machine; the host's
   speed can drift between runs, so each row prints its own seconds per step.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from tinychat.model import Model
from tinychat.model.config import ModelConfig
from tinychat.model.loss import summed_soft_ce

STUDENT = {"d_model": 96, "n_layer": 2, "n_head": 2, "n_kv_head": 1, "head_dim": 48, "d_ff": 256}
TRAIN = "--train.batch_size 8 --train.seq_len 256 --train.lr 3e-3 --train.warmup_steps 30 --train.seed 7"
TRAIN += " --train.eval_every 0 --train.checkpoint_every 0 --train.eval_batches 5"


def step_times(vocab: int, k: int, rounds: int = 7) -> dict[str, float]:
    """Median seconds of one AdamW step of the student (8 x 256 tokens) under each loss, interleaved."""
    torch.manual_seed(0)
    model = Model(ModelConfig(vocab_size=vocab, **STUDENT))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randint(0, vocab, (8, 256)), torch.randint(0, vocab, (8, 256))
    ids = torch.randint(0, vocab, (8, 256, k)).to(torch.int16)
    logp = torch.log_softmax(torch.randn(8, 256, k), -1).half()
    soft = (ids.flatten(0, 1), logp.flatten(0, 1))
    losses = {
        "cross-entropy (fused head)": lambda: model(x, targets=y),
        f"top-{k} KD, fused head": lambda: model(x, targets=y, soft_targets=(ids, logp), alpha=0.5)[0],
        f"top-{k} KD on the logits": lambda: summed_soft_ce(model(x).flatten(0, 1), y.flatten(), soft, 0.5)[0],
    }
    times: dict[str, list[float]] = {name: [] for name in losses}
    for r in range(rounds + 1):
        for name, loss in losses.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            loss().backward()
            opt.step()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def train(out: Path, name: str, cmd: str, run: Path, extra: list[str]) -> dict[str, float]:
    """One `tinychat CMD` run of the student; its steps, seconds (cache, training, process) and val bpb."""
    shape = [a for f, v in STUDENT.items() for a in (f"--model.{f}", str(v))]
    args = [sys.executable, "-m", "tinychat.cli", cmd, "--run", name, "--runs_dir", str(out)]
    args += ["--tokenizer", str(run / "tokenizer"), "--data", str(run / "data" / "tokens"), *shape, *TRAIN.split()]
    args += ["--model.vocab_size", str(vocab_size(run)), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{cmd} {name} failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in rows if x["kind"] == "train"][-1]
    cache = re.search(r"cached in ([0-9.]+) s", r.stdout)
    return {
        "steps": last["step"],
        "cache_s": float(cache.group(1)) if cache else 0.0,
        "train_s": last["elapsed"],
        "wall_s": time.perf_counter() - t0,
        "val_bpb": [x for x in rows if x["kind"] == "eval"][-1]["val_bpb"],
    }


def vocab_size(run: Path) -> int:
    return json.loads((run / "checkpoints" / "pretrain" / "config.json").read_text())["vocab_size"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "run", type=Path, help="a speedrun's directory: its pretrained model teaches, its tokens are the data"
    )
    ap.add_argument("--steps", type=int, default=886, help="the distilled student's steps")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5], help="cross-entropy weights to distil with")
    ap.add_argument("--topk", type=int, default=32, help="the teacher's cached next tokens per position")
    ap.add_argument("--out", type=Path, default=Path("/tmp/distill_bench"), help="runs directory for the students")
    ap.add_argument("--step-time-only", action="store_true", help="only part 1")
    args = ap.parse_args()
    teacher = args.run / "checkpoints" / "pretrain"
    if not (teacher / "config.json").is_file() or not (args.run / "data" / "tokens" / "index.json").is_file():
        sys.exit(f"{args.run} has no checkpoints/pretrain or data/tokens; give a speedrun's run directory.")

    times = step_times(vocab_size(args.run), args.topk)
    base = next(iter(times.values()))
    print(f"| loss ({torch.get_num_threads()} threads) | ms per step | x cross-entropy |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t * 1000:.0f} | {t / base:.2f} |")
    if args.step_time_only:
        return

    rows = []
    for alpha in args.alphas:
        kd = f"kd_a{alpha:g}"
        res = train(args.out, kd, "distill", args.run, [
            "--teacher", str(teacher), "--kd", "forward", "--temperature", "1", "--kd_topk", str(args.topk),
            "--alpha", str(alpha), "--train.max_steps", str(args.steps),
        ])  # fmt: skip
        rows.append((f"top-{args.topk} KD, alpha {alpha:g}", res))
        minutes = (res["cache_s"] + res["train_s"]) / 60
        extra = ["--train.max_time", f"{minutes:.4f}", "--train.max_steps", "1000000"]
        rows.append(
            (f"cross-entropy, the same {minutes * 60:.0f} s", train(args.out, f"ce_{kd}", "pretrain", args.run, extra))
        )
    rows.append(
        (
            "cross-entropy, the same steps",
            train(args.out, "ce_steps", "pretrain", args.run, ["--train.max_steps", str(args.steps)]),
        )
    )
    print("\n| student | steps | teacher cache s | training s | s per step | val bits/byte |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r['steps']} | {r['cache_s']:.1f} | {r['train_s']:.1f} | {r['train_s'] / r['steps']:.3f} "
            f"| {r['val_bpb']:.4f} |"
        )


if __name__ == "__main__":
    main()
