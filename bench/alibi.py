"""Length extrapolation: ALiBi against RoPE, trained at one length and scored at 1x..8x of it.

    .venv/bin/python bench/alibi.py --run runs/s1 [--steps 150] [--seq-len 64] [--out runs/alibi_bench]

Two `tinychat pretrain` runs, identical except --model.position (rope, alibi), same seed and batches, on
the run's tokenizer and tinyworld token shards. Each trained model then scores the validation split in
windows of 1x, 2x, 4x and 8x the training length, its window lifted for the measurement (neither has a
learned position table, so both can run; the question is what their attention does there). Press et
al.'s finding is that ALiBi's loss stays flat past the training length and RoPE's does not. Prints bits
per byte per length and writes OUT/results.json. (tinyworld's documents are short, so longer windows
add little useful context: the test is whether the model survives the unseen lengths, not whether it
profits from them.) A variant already trained under OUT is not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tinychat.cli import main as tinychat


@torch.no_grad()
def bpb_at(model_dir: Path, data: Path, seq_len: int, max_tokens: int) -> float:
    from tinychat.data.loader import val_batches
    from tinychat.model import Model
    from tinychat.tokenizer import Tokenizer
    from tinychat.tokenizer.bytes import token_byte_lengths

    model = Model.from_pretrained(str(model_dir))
    model.cfg = dataclasses.replace(model.cfg, max_seq_len=max(seq_len, model.cfg.max_seq_len))
    token_bytes = torch.tensor(token_byte_lengths(Tokenizer.from_pretrained(model_dir)), dtype=torch.float32)
    nats, n_bytes, seen = 0.0, 0.0, 0
    for x, y in val_batches(data, 1, seq_len, rank=0, world_size=1, max_batches=max(1, max_tokens // seq_len)):
        nats += F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="sum").item()
        n_bytes += token_bytes[y.flatten()].sum().item()
        seen += y.numel()
    return nats / math.log(2) / max(n_bytes, 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory with tokenizer/ and data/tokens/")
    ap.add_argument("--out", default="runs/alibi_bench")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="validation tokens scored per length")
    ap.add_argument("--only", nargs="*", default=["rope", "alibi"])
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    data = run / "data" / "tokens"
    for name in args.only:
        if (out / name / "checkpoints" / "pretrain" / "config.json").is_file():
            continue
        argv = ["pretrain", "--runs-dir", str(out), "--run", name, "--tokenizer", str(run / "tokenizer")]
        argv += ["--data", str(data), "--model.d_model", "128", "--model.n_layer", "4", "--model.n_head", "4"]
        argv += ["--model.n_kv_head", "2", "--model.head_dim", "32", "--model.d_ff", "512", "--samples"]
        argv += ["--model.position", name, "--model.max_seq_len", str(args.seq_len)]
        argv += ["--train.max_steps", str(args.steps), "--train.seq_len", str(args.seq_len), "--train.lr", "3e-3"]
        argv += ["--train.batch_size", str(args.batch_size), "--train.warmup_steps", "30", "--train.seed", "0"]
        argv += ["--train.eval_every", "0", "--train.checkpoint_every", "0", "--train.tensorboard", "false"]
        argv += ["--train.precision", "bf16", "--train.peak_flops", "1", "--train.log_every", "50"]
        if tinychat(argv) != 0:
            return 1
    lengths = [args.seq_len * m for m in (1, 2, 4, 8)]
    results = {
        name: {n: bpb_at(out / name / "checkpoints" / "pretrain", data, n, args.eval_tokens) for n in lengths}
        for name in args.only
    }
    print(f"bits per byte on the validation split; trained at {args.seq_len} tokens, {args.steps} steps")
    print(f"{'model':<7}" + "".join(f"{f'{n // args.seq_len}x ({n})':>13}" for n in lengths))
    for name, row in results.items():
        print(f"{name:<7}" + "".join(f"{row[n]:>13.4f}" for n in lengths))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
