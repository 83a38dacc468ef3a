"""UniPELT (Mao et al. 2022): LoRA, prefix tuning and a bottleneck adapter in one model, each behind a learned gate.

Why gates: no single PEFT method is best on every task and data size; UniPELT trains all three at once and
lets a gate per submodule and token decide how much each one contributes (a gate near 0 turns its method
off for that input). The three parts, as in the paper:
- LoRA on W_q and W_v (`--lora.rank`, default 8): W x + sigmoid(g_L . x) * (alpha/r) B A x (lora.py, gated);
- prefix tuning through its re-parameterisation MLP (`--peft.virtual_tokens`), gated per layer and
  query head (below);
- a serial bottleneck adapter after the feed-forward sublayer (`--peft.adapter_dim`):
  h + sigmoid(g_A . h) * up(relu(down(h))) (adapters.py, gated).

The gates in a decoder. The reference implementation (the adapters library) averages each gate over the
whole sequence, which in a causal model would let a token's output depend on later tokens and would change
the cached keys' meaning as a sequence grows. tinychat's gates are per token instead, computed from what
that token's layer already reads, so training, the KV cache and the paged engine all see the same thing:
- LoRA's and the adapter's gates read the token's input to the module (as the library's do, without the mean);
- the prefix gate reads the token's query q_t in each head (before rotary positions, so it does not depend on
  where the token stands): G = sigmoid(w_h . q_t + b_h), and the prefix's attention scores get + log G.
  That multiplies the weight the token gives the prefix, before normalisation, by G: G -> 0 reads the text
  alone (the base's attention), G = 1 is plain prefix tuning. The bias is added inside attention by a thin
  wrapper around whichever cache the call uses (`GatedCache`), so it holds for the prefix of a training
  step, of `generate`'s KV cache and of the serving engine's shared blocks alike.
At step 0 LoRA's B and the adapter's up projection are zero, so only the (random) prefix moves the model, as
in prefix tuning.

tinychat's format (PEFT has no UniPELT): adapter_config.json {"peft_type": "UNIPELT", "tinychat_format": 1,
"task_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "adapter_dim", "placement",
"num_layers", "num_virtual_tokens", "token_dim", "num_attention_heads" (key/value heads, as PEFT's prefix),
"num_query_heads"}; adapter_model.safetensors: PEFT's LoRA names plus `...q_proj.lora_gate.{weight,bias}`,
the adapters' `...mlp.adapter.{down,up,gate}.{weight,bias}`, the prefix as PEFT's `prompt_embeddings`
(n, n_layer * 2 * kv_dim) and `prefix_gate.weight` (n_layer, n_head, head_dim), `prefix_gate.bias` (n_layer, n_head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.errors import UserError
from tinychat.model.config import ModelConfig
from tinychat.model.peft import adapters, common, lora, prompt
from tinychat.model.transformer import rope_tables, rotate

PEFT_TYPE = "UNIPELT"
LORA_TARGETS = ["q", "v"]  # the paper's (and the LoRA paper's best pair)


class PrefixGate(nn.Module):
    """The prefix's gate, per layer and query head: log sigmoid(w_h . q_t + b_h) added to the prefix's scores."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cfg.n_layer, cfg.n_head, cfg.head_dim) * 0.02)  # (L, H, hd)
        self.bias = nn.Parameter(torch.zeros(cfg.n_layer, cfg.n_head))  # (L, H): G = 0.5 at step 0, as the library

    def log_gate(self, layer: int, q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """(B, H, T) log G for queries q (B, H, T, hd) at positions (B|1, T), rotary undone first."""
        # (YaRN models scale their tables by an attention factor; undoing the unscaled rotation leaves q times
        # that factor, the same in training and inference, so the gate simply learns on that scale)
        cos, sin = rope_tables(positions, inv_freq, torch.float32)  # (B|1, 1, T, hd)
        q0 = rotate(q.float(), cos, -sin)  # the inverse rotation: q as the projection (and q_norm) left it
        w, b = self.weight[layer].float(), self.bias[layer].float()  # (H, hd), (H,)
        return F.logsigmoid(torch.einsum("bhtd,hd->bht", q0, w) + b[None, :, None])

    def wrap(self, model: nn.Module, cache: Any, n: int) -> GatedCache:
        return GatedCache(cache, self, n, model.inv_freq)


class GatedCache:
    """Any cache (model/kv_cache.py's KVCache or PagedKVCache, prompt.py's PrefixCache) whose attention adds
    the prefix gate's log G to the scores of key positions 0..n-1, where every row's prefix sits."""

    def __init__(self, inner: Any, gate: PrefixGate, n: int, inv_freq: torch.Tensor) -> None:
        self.inner, self.gate, self.n, self.inv_freq = inner, gate, n, inv_freq

    def __getattr__(self, name: str) -> Any:  # plan, commit, lengths, batch_size, ...: the inner cache's
        return getattr(self.inner, name)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: Any) -> torch.Tensor:
        lg = self.gate.log_gate(layer, q, m.positions, self.inv_freq)  # (B, H, T)
        B, H, T = lg.shape
        rest = lg.new_zeros(B, H, T, m.span - self.n)
        bias = torch.cat([lg[..., None].expand(B, H, T, self.n), rest], dim=-1)  # (B, H, T, span)
        return self.inner.attend(layer, q, k, v, m, bias)


def lora_config(lcfg: lora.LoraConfig) -> lora.LoraConfig:
    """UniPELT's LoRA settings: --lora.rank (default 8) and alpha; targets q and v unless --lora.targets says
    otherwise (the flag's default, every projection, is read as unset)."""
    lcfg.rank = lcfg.rank or 8
    if lcfg.targets == lora.LoraConfig().targets:
        lcfg.targets = list(LORA_TARGETS)
    if lcfg.use_dora or lcfg.modules_to_save:
        raise UserError("--peft.method unipelt takes plain LoRA: drop --lora.use_dora / --lora.modules_to_save.")
    lcfg.leaf_names()
    return lcfg


def _attach(
    model: nn.Module, spec: prompt.PromptSpec, lcfg: lora.LoraConfig, dim: int
) -> tuple[prompt.VirtualTokens, int, int]:
    """Freeze `model` and attach the three gated parts: (the virtual tokens, LoRA projections, adapters)."""
    vt = prompt.attach_virtual_tokens(model, spec)  # freezes the base
    vt.gate = PrefixGate(model.cfg).to(model.model.norm.weight.device)
    n_lora = lora.apply_lora(model, lcfg, gated=True, freeze=False)
    return vt, n_lora, adapters.apply_adapters(model, "unipelt", dim, 1.0, freeze=False, gated=True)


def apply_unipelt(model: nn.Module, n_virtual: int, encoder_hidden: int, lcfg: lora.LoraConfig, dim: int) -> str:
    """Freeze `model` and attach the three gated parts, to train; returns what was attached."""
    spec = prompt.PromptSpec(kind="prefix", n=n_virtual, encoder_hidden=encoder_hidden, projection=True)
    _, n_lora, n_ad = _attach(model, spec, lcfg, dim)
    return (
        f"unipelt: {n_virtual} gated prefix tokens, gated lora rank {lcfg.rank} on {n_lora} projections, "
        f"{n_ad} gated adapters of width {dim}"
    )


def is_unipelt(model: nn.Module) -> bool:
    vt = getattr(model, "virtual_tokens", None)
    return vt is not None and getattr(vt, "gate", None) is not None


def save_unipelt(
    path: str | Path,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    lcfg: lora.LoraConfig,
    base_model: str | Path,
    task_type: str,
) -> None:
    """Write tinychat's UniPELT format (module docstring) atomically into `path`."""
    cfg, vt = model.cfg, model.virtual_tokens
    tensors = lora.adapter_state(state)
    tensors.update({common.PEFT_PREFIX + k: v for k, v in state.items() if adapters.is_adapter_key(k)})
    tensors["prompt_embeddings"] = prompt.export_prompts(model, state)
    for part in ("weight", "bias"):
        tensors[f"prefix_gate.{part}"] = state[f"virtual_tokens.gate.{part}"].detach().float().cpu().contiguous()
    first = adapters.bottlenecks(model)[0]
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPE,
        "tinychat_format": 1,
        "task_type": task_type,
        "base_model_name_or_path": common.base_path(base_model),
        "r": lcfg.rank,
        "lora_alpha": lcfg.alpha,
        "target_modules": sorted(set(lcfg.leaf_names())),
        "adapter_dim": first.down.out_features,
        "placement": adapters.PLACEMENTS["unipelt"],
        "num_layers": cfg.n_layer,
        "num_virtual_tokens": vt.spec.n,
        "token_dim": vt.token_dim,
        "num_attention_heads": cfg.n_kv_head,
        "num_query_heads": cfg.n_head,
        "inference_mode": True,
    }
    common.write_adapter(path, config, tensors)


def load_unipelt(model: nn.Module, path: str | Path, d: dict[str, Any] | None = None) -> None:
    """Attach the UniPELT adapter at `path` to `model` (frozen, for inference)."""
    d = d or common.read_adapter_config(path, (PEFT_TYPE,))
    src = Path(path) / common.ADAPTER_CONFIG
    cfg = model.cfg
    shape = (d.get("num_layers"), d.get("num_query_heads"), d.get("placement"))
    if shape != (cfg.n_layer, cfg.n_head, adapters.PLACEMENTS["unipelt"]):
        raise UserError(f"{src}: num_layers/num_query_heads/placement do not match this base model.")
    try:
        r, alpha, targets, dim = int(d["r"]), float(d["lora_alpha"]), list(d["target_modules"]), int(d["adapter_dim"])
        n = int(d["num_virtual_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{src}: a UniPELT config needs r, lora_alpha, target_modules, adapter_dim and num_virtual_tokens ({e})."
        ) from e
    lcfg = lora.LoraConfig(rank=r, alpha=alpha, targets=targets)
    vt, _, _ = _attach(model, prompt.PromptSpec(kind="prefix", n=n, trained=False), lcfg, dim)
    tensors = common.read_adapter_weights(path)
    prompt.place_prompts(vt, tensors, path)
    own = dict(model.named_parameters())
    # the file's names (PEFT's prefix stripped on reading) -> the model's parameter names
    wanted = {f"prefix_gate.{p}": f"virtual_tokens.gate.{p}" for p in ("weight", "bias")}
    wanted |= {k: k for k in own if lora.is_lora_key(k) or adapters.is_adapter_key(k)}
    missing = sorted(k for k in wanted if k not in tensors)
    if missing:
        raise UserError(
            f"{src.parent / common.ADAPTER_WEIGHTS}: tensor {missing[0]} is missing ({len(missing)} in all)."
        )
    for k, name in wanted.items():
        common.copy_into(own, name, tensors[k], str(src.parent / common.ADAPTER_WEIGHTS))
    model.requires_grad_(False)
