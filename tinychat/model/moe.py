"""Mixture of experts: a sparse SwiGLU layer in the layout of Qwen3-MoE and Qwen2-MoE.

Why MoE: parameters that a token does not use cost memory but no compute, so E experts of which each
token uses k give a model E/k times the MLP parameters at the FLOPs of one MLP of the same active size.
The price is routing: a router that sends most tokens to a few experts wastes the rest, and router logits
that grow without bound make the softmax brittle (the loss spikes of large MoE runs). Two auxiliary
losses answer them, both added by the training loop through `router_losses` (train/loop.py):
- load balancing (Switch Transformer, Fedus et al. 2021): E * sum_e f_e * P_e, where f_e is the share of
  tokens routed to expert e and P_e its mean router probability; it is smallest when both are uniform.
  This is transformers' `load_balancing_loss_func` per layer (k at perfect balance), so the
  router_aux_loss_coef saved in config.json means the same thing there;
- router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(router logits)^2.

Routing follows transformers exactly (softmax in fp32 over all experts, top-k, optional renormalisation,
weights cast back to the logits' dtype), so a saved directory gives the same logits in
Qwen3MoeForCausalLM / Qwen2MoeForCausalLM (tests/model/test_moe.py). The experts are a ModuleList of
plain SwiGLU MLPs named as on the Hub (`mlp.experts.3.gate_proj.weight`); a token's experts run as one
gathered batch per expert (a loop over experts, not over tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.model.config import ModelConfig


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, expert: Callable[[ModelConfig, int], nn.Module]) -> None:
        super().__init__()
        self.n_experts, self.k, self.norm_topk = cfg.n_experts, cfg.experts_per_token, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(expert(cfg, cfg.expert_d_ff) for _ in range(cfg.n_experts))
        if cfg.shared_expert_d_ff:  # Qwen2-MoE: one expert every token uses, behind a sigmoid gate
            self.shared_expert = expert(cfg, cfg.shared_expert_d_ff)
            self.shared_expert_gate = nn.Linear(cfg.d_model, 1, bias=False)
        self.stats: list[dict[str, torch.Tensor]] = []  # one entry per training forward, read by router_losses

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        B, T, D = x.shape
        h = x.reshape(-1, D)  # (N, d)
        logits = self.gate(h)  # (N, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = probs.topk(self.k, dim=-1)  # (N, k)
        if self.norm_topk:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w.to(logits.dtype)
        out = torch.zeros_like(h)
        flat = top_i.flatten()  # (N k,): token n's j-th expert at n * k + j
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        start = 0
        for e, n in enumerate(counts.tolist()):
            # an expert with no tokens still runs (on zero rows): its gradient is then zero, not missing,
            # which DDP's all-reduce needs from every parameter
            slots = order[start : start + n]
            start += n
            tokens = slots // self.k
            y = self.experts[e](h[tokens]) * top_w.flatten()[slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        if self.training and torch.is_grad_enabled():
            load = counts.float() / flat.numel()  # (E,) share of routed slots; 1/E each when balanced
            self.stats.append(
                {
                    "aux": self.n_experts * (counts.float() / h.shape[0] * probs.mean(0)).sum(),
                    "z": torch.logsumexp(logits.float(), dim=-1).square().mean(),
                    "load": load.detach(),
                }
            )
        return out.view(B, T, D)


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def clear_router_stats(model: nn.Module) -> None:
    """Forget routing records (e.g. of an activation-checkpointing recompute) before a micro-batch's forward."""
    for m in moe_layers(model):
        m.stats.clear()


def router_losses(model: nn.Module, units: int) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
    """(auxiliary loss, metrics) of the forwards since the last call, in the loop's summed form.

    The loop divides by the global unit count, so both come back multiplied by this micro-batch's `units`:
    the loss then weighs as a mean over the batch and the metrics log as means. A dense model gives (0.0, {}).
    """
    layers = moe_layers(model)
    records = [r for m in layers for r in m.stats]
    for m in layers:
        m.stats.clear()
    if not records:
        return 0.0, {}
    cfg: Any = getattr(model, "cfg", None)
    aux_coef = cfg.moe_aux_coef if cfg is not None else 0.01
    z_coef = cfg.moe_z_coef if cfg is not None else 0.001
    aux = torch.stack([r["aux"] for r in records]).mean()
    z = torch.stack([r["z"] for r in records]).mean()
    load = torch.stack([r["load"] for r in records])  # (records, E)
    metrics = {
        "moe_aux": aux.detach() * units,
        "moe_z": z.detach() * units,
        "moe_max_load": load.max(dim=1).values.mean() * load.shape[1] * units,  # 1.0 = perfectly balanced
    }
    for e, share in enumerate(load.mean(0)):
        metrics[f"moe_load_e{e}"] = share * units
    return (aux_coef * aux + z_coef * z) * units, metrics


def inactive_params(cfg: ModelConfig) -> int:
    """Routed-expert parameters a token does not use: (E - k) experts of 3 * d_model * expert_d_ff, per layer."""
    if not cfg.n_experts:
        return 0
    per_expert = 3 * cfg.d_model * cfg.expert_d_ff + (3 * cfg.expert_d_ff + cfg.d_model) * int(cfg.mlp_bias)
    return cfg.n_layer * (cfg.n_experts - cfg.experts_per_token) * per_expert
