"""Low-rank factorisation: every block Linear W (N, K) becomes two, W ≈ B A with A (r, K) and B (N, r).

The truncated SVD W = U S V^T gives the best rank-r approximation (Eckart-Young); the singular values
are split evenly, A = sqrt(S_r) V_r^T and B = U_r sqrt(S_r), so both factors have the same scale and
train well in a recovery fine-tune. A rank r saves parameters only below N K / (N + K); `--rank R` sets
one rank for every layer (capped at min(N, K), where the factorisation is exact), `--sparsity S` picks
each layer's rank so that it keeps (1 - S) of its parameters.

Format: a factorised layer is `...q_proj.down.weight` (r, K) and `...q_proj.up.weight` (N, r), and
config.json lists the ranks under "tinychat_lowrank". transformers has no two-matrix Linear for Llama or
Qwen, so this directory opens in tinychat only (generate, chat, serve, eval and the training loop for a
recovery fine-tune all read it through Model.from_pretrained). Multiply the factors back
(`tinychat factorize --merge`) to get a transformers directory of the original shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.compress.common import block_linear_names, check_paths, load_float, save_with_tokenizer, set_module
from tinychat.model.transformer import Model


@dataclass
class FactorizeConfig:
    model: str = field("", help="model directory (HF layout) to factorise")
    rank: int = field(0, help="one rank for every block Linear (capped at min(out, in), where it is exact)")
    sparsity: float = field(0.0, help="instead of --rank: per-layer ranks that remove this fraction of parameters")
    merge: bool = field(False, help="multiply a factorised --model back into plain Linears (transformers layout)")
    out: str = field("", help="directory to write (tinychat's own layout: config.json tinychat_lowrank)")


class LowRankLinear(nn.Module):
    """y = up(down(x)): a rank-r Linear, (..., K) -> (..., r) -> (..., N); the bias sits on `up`."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def merged_weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight  # (N, K)


def rank_for(n: int, k: int, rank: int, sparsity: float) -> int:
    """The rank of one (n, k) layer: `rank` capped at min(n, k), or the one that keeps (1 - sparsity)."""
    if rank:
        return min(rank, n, k)
    return max(1, min(n, k, int((1 - sparsity) * n * k / (n + k))))


@torch.no_grad()
def factorize_model(model: Model, rank: int = 0, sparsity: float = 0.0) -> Model:
    """Replace, in place, each block Linear by its truncated-SVD LowRankLinear."""
    ranks: dict[str, int] = {}
    for name in block_linear_names(model):
        lin = model.get_submodule(name)
        n, k = lin.weight.shape
        r = rank_for(n, k, rank, sparsity)
        U, S, Vh = torch.linalg.svd(lin.weight.double(), full_matrices=False)  # float64: exact at full rank
        root = S[:r].sqrt()
        low = LowRankLinear(k, n, r, lin.bias is not None).to(lin.weight.dtype)
        low.down.weight.copy_(root[:, None] * Vh[:r])
        low.up.weight.copy_(U[:, :r] * root[None, :])
        if lin.bias is not None:
            low.up.bias.copy_(lin.bias)
        set_module(model, name, low)
        ranks[name] = r
    model.lowrank = ranks
    return model


def apply_lowrank_layout(model: Model, ranks: dict[str, int], source: str = "config.json") -> Model:
    """Give a freshly built (meta) Model the factorised layers config.json's "tinychat_lowrank" names."""
    names = set(block_linear_names(model))
    for name, r in ranks.items():
        if name not in names or not isinstance(r, int) or r < 1:
            raise UserError(f"{source}: tinychat_lowrank entry {name!r}: {r!r} is not a block Linear and rank.")
        lin = model.get_submodule(name)
        set_module(model, name, LowRankLinear(lin.in_features, lin.out_features, r, lin.bias is not None))
    model.lowrank = dict(ranks)
    return model


@torch.no_grad()
def merge_lowrank(model: Model) -> Model:
    """Multiply every LowRankLinear back into one Linear (a plain, transformers-readable model)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LowRankLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.up.bias is not None)
            lin.weight.copy_(mod.merged_weight())
            if mod.up.bias is not None:
                lin.bias.copy_(mod.up.bias)
            set_module(model, name, lin)
    model.lowrank = None
    return model


def run(cfg: FactorizeConfig) -> int:
    from tinychat.model.hf import load_pretrained

    check_paths(cfg.model, cfg.out)
    if cfg.merge:
        model = load_pretrained(cfg.model, dtype=torch.float32)
        if not getattr(model, "lowrank", None):
            raise UserError(f"{cfg.model} is not factorised (config.json has no tinychat_lowrank); nothing to merge.")
        save_with_tokenizer(merge_lowrank(model), cfg.model, cfg.out)
        print(f"wrote {cfg.out}: {model.num_params() / 1e6:.2f}M parameters, plain Linears")
        return 0
    if (cfg.rank > 0) == (0.0 < cfg.sparsity < 1.0) or cfg.rank < 0:
        raise UserError("give exactly one of --rank R (R >= 1) or --sparsity S (0 < S < 1).")
    model = load_float(cfg.model)
    before = model.num_params()
    factorize_model(model, cfg.rank, cfg.sparsity)
    save_with_tokenizer(model, cfg.model, cfg.out)
    ranks = sorted(set(model.lowrank.values()))
    print(
        f"wrote {cfg.out}: parameters {before / 1e6:.2f}M -> {model.num_params() / 1e6:.2f}M, "
        f"ranks {ranks[0]}..{ranks[-1]} over {len(model.lowrank)} layers"
    )
    return 0
