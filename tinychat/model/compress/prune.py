"""Pruning: zero the smallest weights, or remove whole attention heads or MLP channels.

Three methods, one `--sparsity S` (the fraction removed):

- magnitude: unstructured; in every block Linear the fraction S of weights with the smallest |w| become
  zero. The directory is an ordinary dense one (transformers opens it) of the same size and speed:
  dense kernels gain nothing from scattered zeros. It shows how much a model tolerates losing weights;
  the savings need a sparse kernel or a compressor (zstd on the file) to appear.
- heads: structured; round(S * n_head) query heads leave every layer (the config is uniform, so each
  layer loses the same number). A head's importance is the product of the norms of its q_proj rows and
  its o_proj columns (what it reads and what it writes into the residual stream); weight-only, so no
  data is needed. With grouped-query attention the kept heads must share key/value heads evenly: when
  they do (top heads chosen per group) the model stays GQA; when they cannot (3 of 4 heads in 2 groups)
  each kept head gets its own copy of its key/value head (multi-head attention, exactly the same
  function).
- channels: structured; the fraction S of SwiGLU channels (d_ff) with the smallest
  |gate row| * |up row| * |down column| leave every layer, rounded so d_ff stays a multiple of 16 (the
  int8/int4 kernels want that). Fewer heads and a smaller d_ff are plain config fields, so the result is
  a smaller model that transformers opens with no conversion.

A short recovery fine-tune is the ordinary training loop started from the pruned directory
(`tinychat pretrain --init DIR ...`, or sft for a chat model): structured pruning changes only sizes.
Magnitude pruning keeps the dense shape, so its recovery adds `--train.keep_sparsity true`, which writes
the zeros back after every optimiser step (train/sparsity.py); without it the first step regrows them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.compress.common import block_linear_names, check_paths, load_float, save_with_tokenizer
from tinychat.model.transformer import Model


# ---------------------------------------------------------------------------- magnitude
@torch.no_grad()
def prune_magnitude(model: Model, sparsity: float) -> Model:
    """Zero the `sparsity` fraction of smallest-|w| entries of each block Linear, in place."""
    for name in block_linear_names(model):
        w = model.get_submodule(name).weight  # (N, K)
        k = int(round(sparsity * w.numel()))
        if k == 0:
            continue
        cut = w.abs().flatten().kthvalue(k).values
        w.masked_fill_(w.abs() <= cut, 0.0)
    return model


# ---------------------------------------------------------------------------- heads
def _rebuild(model: Model, **changes: int) -> Model:
    """A new Model with some config sizes changed, sharing nothing with the old one yet."""
    cfg = dataclasses.replace(model.cfg, **changes)
    return Model(cfg).to(next(model.parameters()).dtype)


@torch.no_grad()
def prune_heads(model: Model, sparsity: float) -> Model:
    """A new Model with round(sparsity * n_head) fewer query heads in every layer."""
    cfg = model.cfg
    H, G, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    per_group = H // G
    keep = H - int(round(sparsity * H))
    if keep < 1:
        raise UserError(f"--sparsity {sparsity} would remove every attention head ({H}).")
    if keep == H:
        return model
    balanced = keep % G == 0  # the same number kept in every group: still GQA with G kv heads
    choices: list[list[int]] = []  # per layer: kept query heads, ascending
    for layer in model.model.layers:
        a = layer.self_attn
        q = a.q_proj.weight.view(H, hd, -1).norm(dim=(1, 2))  # (H,)
        o = a.o_proj.weight.view(-1, H, hd).norm(dim=(0, 2))  # (H,)
        score = q * o
        if balanced:
            k = keep // G
            top = score.view(G, per_group).topk(k, dim=1).indices + torch.arange(G)[:, None] * per_group
            choices.append(sorted(top.flatten().tolist()))
        else:
            choices.append(sorted(score.topk(keep).indices.tolist()))
    new = _rebuild(model, n_head=keep, n_kv_head=G if balanced else keep)
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if ".self_attn.q_proj" not in k and ".self_attn.k_proj" not in k}
    out = {k: v for k, v in out.items() if ".self_attn.v_proj" not in k and ".self_attn.o_proj." not in k}
    for i, heads in enumerate(choices):
        p = f"model.layers.{i}.self_attn."
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])  # q rows / o columns kept
        kv_heads = list(range(G)) if balanced else [h // per_group for h in heads]  # a kv head per kept head
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kv_heads])
        out[p + "q_proj.weight"] = sd[p + "q_proj.weight"][rows]
        out[p + "o_proj.weight"] = sd[p + "o_proj.weight"][:, rows]
        for name in ("k_proj", "v_proj"):
            out[p + f"{name}.weight"] = sd[p + f"{name}.weight"][kv_rows]
        for name, idx in (("q_proj", rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            if p + f"{name}.bias" in sd:
                out[p + f"{name}.bias"] = sd[p + f"{name}.bias"][idx]
        if p + "o_proj.bias" in sd:
            out[p + "o_proj.bias"] = sd[p + "o_proj.bias"]
    new.load_state_dict(out)
    return new.eval()


# ---------------------------------------------------------------------------- channels
@torch.no_grad()
def prune_channels(model: Model, sparsity: float) -> Model:
    """A new Model whose SwiGLU d_ff lost the `sparsity` fraction of its least important channels."""
    F = model.cfg.d_ff
    step = 16 if F >= 64 else 1
    keep = max(step, int(round((1 - sparsity) * F / step)) * step)
    if keep >= F:
        return model
    new = _rebuild(model, d_ff=keep)
    sd = model.state_dict()
    out = dict(sd)
    for i, layer in enumerate(model.model.layers):
        m = layer.mlp
        score = m.gate_proj.weight.norm(dim=1) * m.up_proj.weight.norm(dim=1) * m.down_proj.weight.norm(dim=0)
        idx = score.topk(keep).indices.sort().values
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            out[p + f"{name}.weight"] = sd[p + f"{name}.weight"][idx]
            if p + f"{name}.bias" in sd:
                out[p + f"{name}.bias"] = sd[p + f"{name}.bias"][idx]
        out[p + "down_proj.weight"] = sd[p + "down_proj.weight"][:, idx]
    new.load_state_dict(out)
    return new.eval()


METHODS = {"magnitude": prune_magnitude, "heads": prune_heads, "channels": prune_channels}


def count_nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


# ---------------------------------------------------------------------------- CLI
@dataclass
class PruneConfig:
    model: str = field("", help="model directory (HF layout) to prune")
    method: Literal["magnitude", "heads", "channels"] = field(
        "channels", help="magnitude (zero small weights), heads (fewer attention heads), channels (smaller d_ff)"
    )
    sparsity: float = field(0.25, help="fraction removed: of each layer's weights, heads or MLP channels")
    out: str = field("", help="directory to write (HF layout, tokenizer copied)")


def run(cfg: PruneConfig) -> int:
    check_paths(cfg.model, cfg.out)
    if not 0.0 <= cfg.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {cfg.sparsity}.")
    if cfg.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}.")
    model = load_float(cfg.model)
    before, nz_before = model.num_params(), count_nonzero(model)
    model = METHODS[cfg.method](model, cfg.sparsity)
    save_with_tokenizer(model, cfg.model, cfg.out)
    c = model.cfg
    print(
        f"wrote {cfg.out}: {cfg.method} {cfg.sparsity:.0%}: parameters {before / 1e6:.2f}M -> "
        f"{model.num_params() / 1e6:.2f}M (non-zero {nz_before / 1e6:.2f}M -> {count_nonzero(model) / 1e6:.2f}M); "
        f"heads {c.n_head} (kv {c.n_kv_head}), d_ff {c.d_ff}"
    )
    return 0
