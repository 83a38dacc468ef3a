"""Where a token is: RoPE context-extension scalings, sliding-window masks and ALiBi biases.

Why a module of its own: these are pure functions of the config and the token positions, shared by the
transformer's forward pass and by `tinychat extend-context`; keeping them out of `Attention` leaves the
attention/KV-cache code one thing to read. Every formula follows transformers' own (modeling_rope_utils.py,
masking_utils.py) so a saved directory gives the same logits there (tests/model/test_long_context.py).
"""

from __future__ import annotations

import math

import torch

from tinychat.model.config import ModelConfig

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_kind(cfg: ModelConfig) -> str:
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def base_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """YaRN (Peng et al. 2023): interpolate the slow dimensions by `factor`, keep the fast ones, ramp between.

    A dimension that turns fewer than beta_slow times over the original context is interpolated, one that
    turns more than beta_fast times is left alone (it only ever sees short relative distances).
    """
    s = cfg.rope_scaling or {}
    d, base, factor = cfg.head_dim, cfg.rope_theta, float(s["factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over old_ctx
        return (d * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    extrapolate = 1 - ramp  # 1: keep the original frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor cos and sin are multiplied by: YaRN's 0.1 ln(factor) + 1 sharpens attention over long
    contexts (interpolation makes distant keys look closer, so the softmax would flatten); 1 otherwise."""
    if rope_kind(cfg) != "yarn":
        return 1.0
    s = cfg.rope_scaling or {}
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    factor = float(s["factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    return mscale(factor)


# ------------------------------------------------------------------------------------------------ masks
def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence 2^(-8/n), 2^(-16/n), ...; for a head
    count that is not a power of two, the closest power's slopes plus every other slope of the next one."""

    def powers(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(powers(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(powers(closest) + powers(2 * closest)[0::2][: n_head - closest])


def layer_masks(
    cfg: ModelConfig,
    pos: torch.Tensor,  # (B|1, T) absolute positions of the new tokens; keys sit at positions 0..S-1
    mask: torch.Tensor | None,  # (B, 1, T, S) bool from the KV cache, or None
    is_causal: bool,
    dtype: torch.dtype,
    n_keys: int | None = None,  # S, the key positions the call reads (a cache's span); default max(pos) + 1
) -> list[tuple[torch.Tensor | None, bool]]:
    """(attn_mask, is_causal) for each layer's scaled_dot_product_attention.

    Plain models get the cache's own (mask, is_causal) everywhere, so the fast paths stay. A sliding-window
    layer lets a query at p see keys k with p - W < k <= p (transformers' rule); ALiBi adds -slope_h * (p - k)
    to every allowed score, as a float mask (-inf where not allowed).
    """
    if cfg.plain_masks:
        return [(mask, is_causal)] * cfg.n_layer
    sliding = [cfg.sliding(i) for i in range(cfg.n_layer)]
    n_keys = n_keys or int(pos.max().item()) + 1
    keys = torch.arange(n_keys, device=pos.device)
    dist = pos[:, None, :, None] - keys[None, None, None, :]  # (B|1, 1, T, S): query minus key position
    if mask is None:
        # no cache mask: either causal from position 0, or aligned rows decoding (every cached key visible)
        mask = dist >= 0
    out: dict[bool, tuple[torch.Tensor | None, bool]] = {}
    for window in set(sliding):
        allowed = mask & (dist < cfg.sliding_window) if window else mask
        if cfg.position == "alibi":
            slopes = alibi_slopes(cfg.n_head).to(pos.device)[None, :, None, None]  # (1, H, 1, 1)
            bias = -slopes * dist.float()  # (B|1, H, T, S)
            out[window] = (bias.masked_fill(~allowed, float("-inf")).to(dtype), False)
        else:
            out[window] = (allowed, False)
    return [out[s] for s in sliding]
