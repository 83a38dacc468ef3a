"""Does the model learn to copy from its context at all? Pure copy drills, no other data.

    .venv/bin/python bench/copying.py [--preset tiny] [--vocab 512] [--steps 1500] [--lr 3e-3] [--no-qk-norm]

Why: the speedrun model never copies a name or number from its prompt (tool calls carry the wrong
numbers, answers from retrieved documents are 0%; docs/speedrun.md). Copying needs an induction circuit
(a previous-token head feeding a head that matches the current token's earlier occurrence; Olsson et
al. 2022), and this bench measures how many optimizer steps the model needs to form one on the easiest
data there is: every window is drills `<eos> x1 .. xn <sep> x1 .. xn` with n in [5, 30) and xi drawn
uniformly from --vocab ids, packed into --batch x --seq windows like pretraining. Half the tokens are
predictable by copying; a model that copies drives their accuracy towards 1 and the loss towards half
of ln(vocab). The optimizer is tinychat's (fused AdamW, no decay on gains), warm-up 50 steps, then
constant; bf16 autocast as in training. Prints loss and copy accuracy every --every steps.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from tinychat.model import Model, preset
from tinychat.model.transformer import rope_inv_freq
from tinychat.train.config import TrainConfig
from tinychat.train.optim import build_optimizer

EOS, SEP, FIRST = 1, 2, 100  # drill ids start at FIRST so the two markers never occur inside a drill


def drills(rng: np.random.Generator, n_tokens: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, copyable) of length n_tokens: copyable[t] is True where token t repeats the drill's first half."""
    toks: list[int] = []
    copy: list[bool] = []
    while len(toks) < n_tokens:
        xs = rng.integers(FIRST, FIRST + vocab, size=int(rng.integers(5, 30))).tolist()
        toks += [EOS, *xs, SEP, *xs]
        copy += [False] * (len(xs) + 2) + [True] * len(xs)
    return np.array(toks[:n_tokens]), np.array(copy[:n_tokens])


def batch(rng: np.random.Generator, b: int, t: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    toks, copy = drills(rng, b * (t + 1), vocab)
    w, c = torch.from_numpy(toks.reshape(b, t + 1)), torch.from_numpy(copy.reshape(b, t + 1))
    return w[:, :-1], w[:, 1:], c[:, 1:]  # x, y, whether y is a copy


@torch.no_grad()
def previous_token_head(model: Model, scale: float = 4.0) -> None:
    """Make layer 0's query head 0 (and its key/value head 0) attend to the previous position, by weights only.

    Queries and keys of that head become constants (zero weights, biases b_q and b_k); RoPE rotates them by
    position, so q_i . k_j = sum over frequency pairs of b_q^T R(j - i) b_k. With b_q = R(+1) b_k every pair's
    term peaks together at j = i - 1, so the head looks one token back whatever the tokens are: half of an
    induction circuit, present from step 0 instead of learned. It is only an initialisation of Qwen2's
    layout, so the model still saves and loads as a Hugging Face checkpoint.
    """
    cfg = model.cfg
    attn = model.model.layers[0].self_attn
    hd, half = cfg.head_dim, cfg.head_dim // 2
    theta = rope_inv_freq(cfg)  # (hd/2,): pair (d, d + hd/2) turns by theta[d] per position
    k = torch.zeros(hd)
    k[:half] = scale  # every pair at angle 0
    # q . k over a gap of j - i positions is scale^2 * sum_d cos(theta_d * (1 + j - i)): all peak at j = i - 1
    q = torch.cat([scale * torch.cos(theta), -scale * torch.sin(theta)])
    attn.q_proj.weight[:hd] = 0.0
    attn.q_proj.bias[:hd] = q
    attn.k_proj.weight[:hd] = 0.0
    attn.k_proj.bias[:hd] = k


@torch.no_grad()
def copy_accuracy(model: Model, rng: np.random.Generator, args: argparse.Namespace) -> float:
    model.eval()
    x, y, c = batch(rng, 32, args.seq, args.vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(x).argmax(-1)
    model.train()
    return float((pred[c] == y[c]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=512, help="distinct drill tokens (the model's vocabulary is 8192)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--layers", type=int, default=0, help="override the preset's number of layers")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    ap.add_argument("--no-qk-norm", action="store_true", help="Llama-style attention (no RMSNorm on q and k)")
    ap.add_argument(
        "--prev-token-init",
        action="store_true",
        help="Qwen2-style attention (q/k biases, no QK-norm); layer 0's first head starts on the previous token",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    depth = {"n_layer": args.layers} if args.layers else {}
    if args.prev_token_init:
        model = Model(preset(args.preset, vocab_size=8192, qk_norm=False, qkv_bias=True, **depth))
        previous_token_head(model)
    else:
        model = Model(preset(args.preset, vocab_size=8192, qk_norm=not args.no_qk_norm, **depth))
    opt = build_optimizer(model, TrainConfig(lr=args.lr, weight_decay=0.1), torch.device("cpu"))
    rng, eval_rng = np.random.default_rng(0), np.random.default_rng(1)
    print(
        f"{args.preset} ({model.num_params() / 1e6:.1f}M, {model.cfg.n_layer} layers), qk_norm {model.cfg.qk_norm}, "
        f"previous-token head at init {args.prev_token_init}, {args.vocab} drill tokens, "
        f"lr {args.lr}, {args.batch}x{args.seq}; ln(vocab)/2 = {math.log(args.vocab) / 2:.2f} is a copier's loss"
    )
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        x, y, _ = batch(rng, args.batch, args.seq, args.vocab)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every == 0:
            acc = copy_accuracy(model, eval_rng, args)
            print(f"step {step:>5}  loss {loss.item():.3f}  copy accuracy {acc:.3f}  ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
