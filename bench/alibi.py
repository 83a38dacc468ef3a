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

import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from moe import bench_parser, pretrain_argv  # bench/moe.py, beside this file

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
    ap = bench_parser(__doc__, "runs/alibi_bench", seq_len=64, batch_size=16)
    ap.add_argument("--eval-tokens", type=int, default=8192, help="validation tokens scored per length")
    ap.add_argument("--only", nargs="*", default=["rope", "alibi"])
    args = ap.parse_args()
    out, data = Path(args.out), Path(args.run) / "data" / "tokens"
    for name in args.only:
        if (out / name / "checkpoints" / "pretrain" / "config.json").is_file():
            continue
        extra = ["--model.position", name, "--model.max_seq_len", str(args.seq_len)]
        if tinychat(pretrain_argv(args, name, 0, *extra)) != 0:
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
