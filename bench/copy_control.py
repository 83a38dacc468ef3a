"""Control for bench/copying.py: a 2-layer transformer written from scratch, sharing no model or optimizer code.

    .venv/bin/python bench/copy_control.py [VOCAB=512] [SEQ=256] [LR=1e-3] [MLP=0] [SMALL_VOCAB_STEPS=0] [STEPS=3000]
                                           [BATCH=16] [DRILL_FRACTION=1]

LayerNorm, learned absolute positions, a separate output head, attention only unless MLP=1, torch's AdamW
without decay, fp32; the same drills (bench/copying.py's batch). SMALL_VOCAB_STEPS > 0 first trains that
many steps on 16 drill tokens (a curriculum) before switching to VOCAB. The last line names the first
evaluation (every 100 steps) with more than half of the copyable tokens right: where the plateau ended.
DRILL_FRACTION < 1 makes only that share of each batch's rows drills and the rest random tokens with nothing
to copy: copy drills diluted in text that the circuit does not help.
If this model too sits at ln(VOCAB), the copy plateau is a property of the task and the step budget, not of
tinychat's model or optimizer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from copying import FIRST, batch  # noqa: E402

D, HEADS, LAYERS = 128, 4, 2


class Block(nn.Module):
    def __init__(self, mlp: bool) -> None:
        super().__init__()
        self.ln, self.qkv, self.o = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ln2 = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)) if mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln(x)).view(B, T, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, D))
        return x if self.mlp is None else x + self.mlp(self.ln2(x))


class Control(nn.Module):
    def __init__(self, n_vocab: int, seq: int, mlp: bool) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(n_vocab, D), nn.Embedding(seq, D)
        self.blocks = nn.ModuleList(Block(mlp) for _ in range(LAYERS))
        self.lnf, self.head = nn.LayerNorm(D), nn.Linear(D, n_vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, n_vocab)
        h = self.emb(x) + self.pos(torch.arange(x.size(1)))
        for b in self.blocks:
            h = b(h)
        return self.head(self.lnf(h))


def main() -> None:
    args = [float(a) for a in sys.argv[1:]] + [512, 256, 1e-3, 0, 0, 3000, 16, 1.0][len(sys.argv) - 1 :]
    vocab, seq, lr, mlp, small_steps, steps = int(args[0]), int(args[1]), args[2], bool(args[3]), args[4], args[5]
    rows, drill_rows = int(args[6]), max(1, round(int(args[6]) * args[7]))
    left = None
    torch.manual_seed(0)
    model = Control(FIRST + vocab, seq, mlp)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, eval_rng = np.random.default_rng(0), np.random.default_rng(1)
    t0 = time.time()
    for step in range(int(steps) + 1):
        x, y, _ = batch(rng, drill_rows, seq, 16 if step < small_steps else vocab)
        if drill_rows < rows:  # the other rows: uniform random tokens
            r = torch.from_numpy(rng.integers(FIRST, FIRST + vocab, size=(rows - drill_rows, seq + 1)))
            x, y = torch.cat([x, r[:, :-1]]), torch.cat([y, r[:, 1:]])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                x, y, c = batch(eval_rng, 32, seq, vocab)
                acc = float((model(x).argmax(-1)[c] == y[c]).float().mean())
            print(
                f"step {step}  loss {loss.item():.3f}  copy accuracy {acc:.3f}  ({time.time() - t0:.0f}s)", flush=True
            )
            if left is None and acc > 0.5:
                left = step
    print(f"plateau left (copy accuracy > 50%) at step {left}" if left is not None else "still on the plateau")


if __name__ == "__main__":
    main()
