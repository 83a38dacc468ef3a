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

Soft targets (distillation with a teacher's cached top-k, train/distill.py): the loss becomes
alpha * CE + (1 - alpha) * KL(teacher || student) over K + 1 outcomes, the teacher's K likeliest tokens and
"the rest" together. Its gradient in the logits is again made from the chunk's softmax p: p - alpha * onehot
- (1 - alpha) * q, where q is the teacher's K probabilities on its K tokens and its rest mass t_r spread over
the other tokens as the student spreads its own (q_j = t_r * p_j / P_r, P_r the student's rest mass). So
distillation costs what cross-entropy costs, plus a gather and a scatter of K per row: with the logits
materialised for a log-softmax a 1M-parameter student's step cost 1.47x a cross-entropy step on a 2-core
AVX2 CPU (docs/compress.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CHUNK_LOGITS = 1 << 21  # logits per chunk: 256 rows of an 8,192-token vocabulary


def coarse_kl(s_k: torch.Tensor, t_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(teacher || student) over K + 1 outcomes from both sides' log-probabilities of the teacher's K tokens
    (..., K), fp32: (...) the KL, then each side's log-probability of the rest, log(1 - sum exp), clamped where
    the K tokens hold all the mass."""
    t_rest = torch.log1p(-t_k.exp().sum(-1).clamp(max=1 - 1e-6))
    s_rest = torch.log1p(-s_k.exp().sum(-1).clamp(max=1 - 1e-6))
    return (t_k.exp() * (t_k - s_k)).sum(-1) + t_rest.exp() * (t_rest - s_rest), t_rest, s_rest


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,  # (N, d)
        weight: torch.Tensor,  # (V, d)
        targets: torch.Tensor,  # (N,) ids, -100 = no loss
        dt: torch.dtype,
        soft_ids: torch.Tensor | None = None,  # (N, K) the teacher's K likeliest next tokens
        soft_logp: torch.Tensor | None = None,  # (N, K) their log-probabilities
        alpha: float = 1.0,  # weight of the cross-entropy; 1 - alpha weighs the KL
    ) -> torch.Tensor:
        rows = max(16, CHUNK_LOGITS // weight.shape[0])
        soft = soft_ids is not None
        with torch.autocast(h.device.type, enabled=False):
            hd, wd = h.to(dt), weight.to(dt)
            grad_h = torch.empty_like(hd)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            sums = torch.zeros(2, dtype=torch.float32, device=h.device)  # summed CE, summed KL
            for s in range(0, h.shape[0], rows):
                hc, yc = hd[s : s + rows], targets[s : s + rows]
                logits = (hc @ wd.T).float()  # (rows, V)
                lse = torch.logsumexp(logits, -1)  # (rows,)
                valid = yc != -100
                yi = torch.where(valid, yc, 0)
                sums[0] += ((lse - logits.gather(1, yi[:, None])[:, 0]) * valid).sum()
                if soft:
                    ids = soft_ids[s : s + rows].long()  # (rows, K)
                    t_k = soft_logp[s : s + rows].float()
                    s_k = logits.gather(1, ids) - lse[:, None]  # the student's log-probabilities there
                    kl, t_rest, s_rest = coarse_kl(s_k, t_k)
                    sums[1] += (kl * valid).sum()
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                if soft:  # the KL's part: p - q, q spreading the teacher's rest mass as the student does
                    p.mul_(1.0 - (1.0 - alpha) * (t_rest - s_rest).exp()[:, None])
                    p.scatter_(1, ids, s_k.exp() - (1.0 - alpha) * t_k.exp())
                p[torch.arange(len(yc), device=p.device), yi] -= alpha if soft else 1.0
                p.mul_(valid[:, None])  # d(loss)/d(logits) for this chunk
                pd = p.to(dt)
                grad_h[s : s + rows] = pd @ wd
                grad_w += (pd.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        if not soft:
            return sums[0]
        return torch.stack([alpha * sums[0] + (1.0 - alpha) * sums[1], sums[0], sums[1]])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        if grad.dim():  # soft targets: only the combined loss (element 0) carries a gradient
            grad = grad[0]
        return (grad_h * grad).to(ctx.dtypes[0]), (grad_w * grad).to(ctx.dtypes[1]), None, None, None, None, None


def summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, vocab) logits, (B, T) targets -> summed cross-entropy over targets != -100, in fp32: the plain
    path, for heads the fused one does not take and for callers that hold logits already."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def topk_kl(
    s: torch.Tensor,  # (..., V) the student's log-probabilities at the temperature (fp32)
    teacher_ids: torch.Tensor,  # (..., K) the teacher's K likeliest next tokens
    teacher_logp: torch.Tensor,  # (..., K) their log-probabilities at the temperature
    mask: torch.Tensor,  # (...) bool
    temperature: float,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) over K + 1 outcomes (the K tokens, then all others together), summed over
    masked positions (fp32); with K = V it is the full forward KL. The student's log-probabilities come in
    computed, so at T = 1 one log-softmax serves cross-entropy too. The fused path above takes the same KL
    chunk by chunk; this one serves heads it does not take and temperatures other than 1."""
    kl = coarse_kl(s.gather(-1, teacher_ids.long()), teacher_logp.float())[0]  # (...)
    return (kl * mask).sum() * temperature**2


def summed_soft_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    soft_targets: tuple[torch.Tensor, torch.Tensor],
    alpha: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(N, V) logits, (N,) targets, a teacher's (N, K) top-k ids and log-probabilities (at `temperature`) ->
    (3,) fp32: summed alpha * CE + (1 - alpha) * T^2 * KL over the K + 1 outcomes, then CE and KL alone
    (without gradient); the plain path of linear_cross_entropy's soft targets, and the one for T != 1."""
    mask = targets != -100
    s = F.log_softmax(logits.float(), dim=-1)
    ce = -(s.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask).sum()
    s_t = s if temperature == 1.0 else F.log_softmax(logits.float() / temperature, dim=-1)
    kl = topk_kl(s_t, *soft_targets, mask, temperature)
    return torch.stack([alpha * ce + (1.0 - alpha) * kl, ce.detach(), kl.detach()])


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    soft_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Summed cross-entropy of logits h @ weight.T against targets (ignoring -100), as an fp32 scalar.

    h: (N, d) hidden states; weight: (V, d) the head; targets: (N,) ids. Under autocast the matmuls run in
    its dtype (as nn.Linear's would), else in h's. With soft_targets, a teacher's (N, K) top-k ids and
    log-probabilities: (3,) fp32, the summed alpha * CE + (1 - alpha) * KL over the K + 1 outcomes, then CE
    and KL alone (those two without gradient)."""
    dev = h.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    ids, logp = soft_targets if soft_targets is not None else (None, None)
    return _LinearCrossEntropy.apply(h, weight, targets, dt, ids, logp, alpha)
