"""The optimisers (AdamW, or Muon for the hidden matrices) and the learning-rate schedules.

Why no decay on norms and biases: decaying a gain vector towards zero fights the normalisation it
implements; every modern recipe (GPT-3, Llama, nanoGPT) exempts one-dimensional parameters.

Muon (Keller Jordan 2024; what modded-nanogpt and nanochat train with): for each hidden weight matrix,
momentum SGD whose update is replaced by the nearest semi-orthogonal matrix (five Newton-Schulz iterations
on the momentum, in bf16). Every direction of the update then moves at the same rate, instead of the
few dominant ones AdamW's updates concentrate on; the references report a loss reached in fewer tokens.
Not so far here: on the cpu-tiny speedrun's data it matched AdamW's loss per step (0.927 vs 0.925 at step
250) at 0.62x the tokens/s on 2 CPU cores (docs/speedrun.md), so AdamW stays the default. Embeddings, the
output head and the gains stay on AdamW, as in both references: they are lookup tables and vectors, not
linear maps.
"""

from __future__ import annotations

import math

import torch

from tinychat.errors import UserError
from tinychat.train.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "muon":
        return build_muon(model, cfg)
    if cfg.mup_base_width:
        return build_mup_adamw(model, cfg, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    decay = [p for n, p in named if not is_gain(n, p)]
    no_decay = [p for n, p in named if is_gain(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused AdamW: one kernel for all parameters (CPU and CUDA in torch >= 2.4); not for DTensor on gloo
    fused = device.type in ("cuda", "cpu") and not any(type(p).__name__ == "DTensor" for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at `step`, where `progress` in [0, 1] is how much of the budget is spent."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        start = 1.0 - cfg.decay_frac
        if progress <= start:
            return 1.0
        return 1.0 - (1.0 - floor) * (progress - start) / max(cfg.decay_frac, 1e-9)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- μP
def width_ratio(model: torch.nn.Module, base: int) -> float:
    """base / d_model: how much narrower the base model is than this one (wrappers looked through)."""
    cfg = getattr(model, "cfg", None) or model.module.cfg
    return base / cfg.d_model


def build_mup_adamw(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with μP's learning rates (Yang et al., Tensor Programs V, for Adam): a hidden matrix's update
    moves its output by ~ lr x fan_in, so its LR shrinks as base/width to keep that change the same at every
    width; embeddings and gains (fan-in independent of width) keep the base LR. The output logits multiplier
    of full μP is left out: tinychat ties the head to the embedding by default."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    tables = [p for n, p in named if not is_gain(n, p) and not is_hidden_matrix(n, p)]
    gains = [p for n, p in named if is_gain(n, p)]
    groups = [
        {"params": hidden, "weight_decay": cfg.weight_decay, "lr_scale": width_ratio(model, cfg.mup_base_width)},
        {"params": tables, "weight_decay": cfg.weight_decay},
        {"params": gains, "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu") and not any(type(p).__name__ == "DTensor" for _, p in named)
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


@torch.no_grad()
def mup_init(model: torch.nn.Module, base: int) -> None:
    """μP's initialisation for hidden matrices: std x sqrt(base/width), i.e. variance ~ 1/fan_in, so
    activations keep their scale as the model widens (the base width keeps the model's own init)."""
    ratio = width_ratio(model, base)
    for name, p in model.named_parameters():
        if is_hidden_matrix(name, p):
            p.mul_(ratio**0.5)


# ---------------------------------------------------------------------------------------------- Muon
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the quintic Newton-Schulz coefficients of the Muon reference


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (all singular values pushed towards 1), in bf16; shape kept."""
    a, b, c = NS_COEFFS
    x = g.to(torch.bfloat16)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT  # (short, long): the Gram matrix below is the small one
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.mT  # (short, short)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def is_gain(name: str, p: torch.nn.Parameter) -> bool:
    """A scale vector, kept out of weight decay (and out of Muon): norms' gains, biases, DoRA's magnitudes, and
    IA3's scales, which PEFT stores as (out, 1) or (1, in) matrices but which start at the base's 1: a decay
    toward 0 would pull them away from the base model instead of toward it."""
    return p.ndim < 2 or name.endswith("ia3_l")


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """Muon's parameters: 2-D weights of the blocks; not the token embedding, the output head or a gain."""
    return p.ndim == 2 and not is_gain(name, p) and "embed" not in name and "lm_head" not in name


class Muon(torch.optim.Optimizer):
    """Muon on groups marked {"muon": True}, AdamW on the others; one optimiser, so the loop, the LR
    schedule (each group's lr_scale) and checkpoints treat it like any other."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False, momentum=0.95))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["muon"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - group["momentum"])
                    update = orthogonalize(p.grad.lerp(buf, group["momentum"]))  # Nesterov
                    # rows/cols scaling: the same RMS update whatever the matrix's aspect ratio
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.mul_(1 - lr * wd).add_(update, alpha=-lr * scale)
                    continue
                b1, b2 = group["betas"]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                # a Python int (a checkpoint gives it back as a tensor): bias corrections stay in double precision
                t = state["step"] = int(state["step"]) + 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - b1**t))


def build_muon(model: torch.nn.Module, cfg: TrainConfig) -> Muon:
    """Muon for the hidden matrices at cfg.muon_lr, AdamW at cfg.lr for embeddings, head and gains."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(type(p).__name__ == "DTensor" for _, p in named):
        raise UserError("--train.optimizer muon does not shard yet (FSDP/TP): use adamw with distributed training.")
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    tables = [p for n, p in named if not is_gain(n, p) and not is_hidden_matrix(n, p)]
    gains = [p for n, p in named if is_gain(n, p)]
    groups = [
        {"params": hidden, "muon": True, "weight_decay": cfg.weight_decay, "lr_scale": cfg.muon_lr / cfg.lr},
        {"params": tables, "weight_decay": cfg.weight_decay},
        {"params": gains, "weight_decay": 0.0},
    ]
    return Muon([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
