"""AdamW with decay on matrices only, and the learning-rate schedules.

Why no decay on norms and biases: decaying a gain vector towards zero fights the normalisation it
implements; every modern recipe (GPT-3, Llama, nanoGPT) exempts one-dimensional parameters.
"""

from __future__ import annotations

import math

import torch

from tinychat.train.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
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
