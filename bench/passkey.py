"""Passkey retrieval at 1x/2x/4x/8x the trained length: before extension, after scaling alone, after a fine-tune.

    .venv/bin/python bench/passkey.py --run runs/s1 [--out runs/pk] [--factor 4] [--method yarn]

Starting point: the run's pretrained model (the cpu-tiny speedrun trains 256-token windows, so the
trained length L is 256). The stages, each one tinychat command, skipped when its output exists:
1. data: `tinychat world passkey` documents (short ones of 3-20 filler sentences for L, long ones of
   15-85 sentences for L x factor), each tokenized together with the run's tinyworld pretraining text;
2. pk1x: `tinychat pretrain --init RUN/checkpoints/pretrain` at seq_len L on the short mixture for
   --format-steps steps: the tiny model has never seen the passkey format and retrieves nothing at any
   length before this (0/8 at L and 2L on s1), so the format is taught at the trained length first;
3. scaled: `tinychat extend-context --factor F --method M --original L` (weights unchanged);
4. long: `tinychat pretrain --init scaled` at seq_len L x F on the long mixture for --long-steps steps
   (the long-context fine-tune; its tokens and steps are printed, since wall time on a shared machine
   says nothing);
5. `tinychat eval --suite passkey` of pk1x, scaled and long at L, 2L, 4L and 8L (--samples prompts per
   length, key depths spread evenly).
Prints the table and writes OUT/passkey.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinychat.cli import main as tinychat


def step(argv: list[str]) -> None:
    print("$ tinychat " + " ".join(argv), flush=True)
    if tinychat(argv) != 0:
        raise SystemExit(f"failed: tinychat {' '.join(argv)}")


def train_tokens(out: Path, stage: str) -> tuple[int, int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["stage"] == stage and r["kind"] == "train"]
    return (train[-1]["step"], train[-1]["tokens"]) if train else (0, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a speedrun directory (checkpoints/pretrain, tokenizer, world)")
    ap.add_argument("--out", default="runs/pk")
    ap.add_argument("--length", type=int, default=256, help="the length the model was trained at")
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--method", default="yarn", choices=["linear", "ntk", "yarn"])
    ap.add_argument("--format-steps", type=int, default=600)
    ap.add_argument("--long-steps", type=int, default=100)
    ap.add_argument("--long-batch", type=int, default=4)
    ap.add_argument("--samples", type=int, default=20)
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    L, long_len = args.length, int(args.length * args.factor)
    tok = str(run / "tokenizer")
    world = str(run / "world" / "pretrain" / "train.jsonl")
    for name, lo, hi, seed in (("short", 3, 20, 1), ("long", 15, 85, 2)):
        if not (out / f"tok_{name}" / "index.json").is_file():
            docs = str(out / f"passkey_{name}.jsonl")
            step(["world", "passkey", "--out", docs, "--docs", "6000" if name == "short" else "1500",
                  "--min-sentences", str(lo), "--max-sentences", str(hi), "--seed", str(seed)])  # fmt: skip
            step(["data", "tokenize", docs, world, "--tokenizer", tok, "--out", str(out / f"tok_{name}"),
                  "--workers", "1", "--progress", "false"])  # fmt: skip
    common = ["--runs_dir", str(out.parent), "--run", out.name, "--tokenizer", tok, "--samples"]
    common += ["--train.eval_every", "0", "--train.checkpoint_every", "0", "--train.tensorboard", "false"]
    ckpt = out / "checkpoints"
    if not (ckpt / "pk1x" / "config.json").is_file():
        step(["pretrain", *common, "--stage", "pk1x", "--init", str(run / "checkpoints" / "pretrain"),
              "--data", str(out / "tok_short"), "--train.seq_len", str(L), "--train.batch_size", "8",
              "--train.max_steps", str(args.format_steps), "--train.lr", "1e-3",
              "--train.warmup_steps", "10"])  # fmt: skip
    scaled = out / f"scaled_{args.method}{args.factor:g}"
    if not (scaled / "config.json").is_file():
        step(["extend-context", "--model", str(ckpt / "pk1x"), "--out", str(scaled), "--factor", str(args.factor),
              "--method", args.method, "--original", str(L)])  # fmt: skip
    long_stage = f"long_{args.method}{args.factor:g}"
    if not (ckpt / long_stage / "config.json").is_file():
        step(["pretrain", *common, "--stage", long_stage, "--init", str(scaled), "--data", str(out / "tok_long"),
              "--train.seq_len", str(long_len), "--train.batch_size", str(args.long_batch),
              "--train.max_steps", str(args.long_steps), "--train.lr", "5e-4",
              "--train.warmup_steps", "5"])  # fmt: skip
    lengths = [str(L * m) for m in (1, 2, 4, 8)]
    table = {}
    for name, model in (("pk1x", ckpt / "pk1x"), ("scaled", scaled), (long_stage, ckpt / long_stage)):
        res = out / f"passkey_{name}.json"
        if not res.is_file():
            step(["eval", "--model", str(model), "--suite", "passkey", "--lengths", *lengths,
                  "--passkey-samples", str(args.samples), "--out", str(res)])  # fmt: skip
        table[name] = {n: r["accuracy"] for n, r in json.loads(res.read_text())["passkey"]["lengths"].items()}
    steps, tokens = train_tokens(out, long_stage)
    print(f"\npasskey accuracy, trained length {L}; long fine-tune: {steps} steps, {tokens:,} tokens at {long_len}")
    print(f"{'model':<16}" + "".join(f"{f'{int(n) // L}x ({n})':>14}" for n in lengths))
    for name, accs in table.items():
        print(f"{name:<16}" + "".join(f"{100 * accs[n]:>13.0f}%" for n in lengths))
    (out / "passkey.json").write_text(json.dumps({"table": table, "long_steps": steps, "long_tokens": tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
