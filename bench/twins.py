"""What `--train.twin_tokens` costs per training step: the same model and batch with and without it, in one run.

    .venv/bin/python bench/twins.py --tokenizer runs/speedrun/tokenizer [--preset tiny] [--reps 4] [--steps 10]

Both arms start from the same weights and train on the same random batch (16 x 256, bf16 autocast where the
speedrun would use it, fused AdamW), alternating in blocks of --steps so that a change in the machine's load
hits both. Printed: seconds per step of each block, the medians and their ratio. The parametrisation
(train/twins.py) adds E = W + S[pair] for the embedding and again for the tied head, and the gather's
backward, to every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from tinychat.model import Model
from tinychat.model.config import preset
from tinychat.tokenizer import Tokenizer
from tinychat.train.twins import apply_twins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="a run's tokenizer directory (its vocabulary sets the pairs)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    tok = Tokenizer.from_pretrained(args.tokenizer)
    cfg = dataclasses.replace(preset(args.preset), vocab_size=tok.vocab_size, max_seq_len=max(512, args.seq))
    torch.manual_seed(0)
    x = torch.randint(0, tok.vocab_size, (args.batch, args.seq + 1))

    arms = {}
    for twins in (False, True):
        torch.manual_seed(0)
        model = Model(cfg)
        pairs = apply_twins(model, tok) if twins else 0
        arms["twins" if twins else "plain"] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True))
    print(f"{args.preset}, {args.batch} x {args.seq}, {pairs} twin pairs, {torch.get_num_threads()} threads")

    def block(model: Model, opt: torch.optim.Optimizer, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t) / n

    for arm in arms.values():
        block(*arm, 3)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.reps):
        for name, arm in arms.items():
            times[name].append(block(*arm, args.steps))
    for name, ts in times.items():
        print(f"{name:6s} s/step " + " ".join(f"{t:.3f}" for t in ts) + f"  median {statistics.median(ts):.3f}")
    print(f"twins / plain: {statistics.median(times['twins']) / statistics.median(times['plain']):.3f}x")


if __name__ == "__main__":
    main()
