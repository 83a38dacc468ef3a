"""The LM head and the cross-entropy in one pass over row chunks, without the (tokens, vocab) logits.

Why: at the speedrun's shape (16 x 256 tokens, an 8,192-token vocabulary) the plain path materialises
33.5M logits per step in bf16, again in fp32 for the loss, once more for log-softmax's output and twice
for their gradients: ~0.6 GB written and read per step, freshly allocated each time. On a 2-core CPU the
profile showed log-softmax, its backward and those copies taking about as long as every matmul of the
model together. Here the rows go through in chunks of ~2M logits (8 MB in fp32, a cache's worth), and
each chunk's gradient is made at once from its softmax (p - onehot), so nothing of vocabulary size
outlives its chunk. The FLOPs are the plain path's: the head's matmul forward and its two matmuls
backward, done in the forward pass (as Liger-Kernel's fused linear cross-entropy does) and scaled by the
incoming gradient in backward, since the summed loss is the end of the graph.

Numerics: the matmuls run in the autocast dtype as the plain path's do, the softmax and the loss in fp32;
the head's gradient is accumulated in fp32 over chunks. Tested against F.cross_entropy on the full logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CHUNK_LOGITS = 1 << 21  # logits per chunk: 256 rows of an 8,192-token vocabulary


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dt: torch.dtype
    ) -> torch.Tensor:
        rows = max(16, CHUNK_LOGITS // weight.shape[0])
        with torch.autocast(h.device.type, enabled=False):
            hd, wd = h.to(dt), weight.to(dt)
            grad_h = torch.empty_like(hd)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], rows):
                hc, yc = hd[s : s + rows], targets[s : s + rows]
                logits = (hc @ wd.T).float()  # (rows, V)
                lse = torch.logsumexp(logits, -1)  # (rows,)
                valid = yc != -100
                yi = torch.where(valid, yc, 0)
                loss += ((lse - logits.gather(1, yi[:, None])[:, 0]) * valid).sum()
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                p[torch.arange(len(yc), device=p.device), yi] -= 1.0
                p.mul_(valid[:, None])  # d(loss)/d(logits) for this chunk
                pd = p.to(dt)
                grad_h[s : s + rows] = pd @ wd
                grad_w += (pd.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad).to(ctx.dtypes[0]), (grad_w * grad).to(ctx.dtypes[1]), None, None


def summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, vocab) logits, (B, T) targets -> summed cross-entropy over targets != -100, in fp32: the plain
    path, for heads the fused one does not take and for callers that hold logits already."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits h @ weight.T against targets (ignoring -100), as an fp32 scalar.

    h: (N, d) hidden states; weight: (V, d) the head; targets: (N,) ids. Under autocast the matmuls run in
    its dtype (as nn.Linear's would), else in h's."""
    dev = h.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    return _LinearCrossEntropy.apply(h, weight, targets, dt)
