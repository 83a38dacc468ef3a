"""The decoder-only Transformer of the Llama / Qwen2 / Qwen3 family.

Pre-norm blocks (RMSNorm), rotary position embeddings, grouped-query attention through
torch's scaled_dot_product_attention, a SwiGLU MLP. Module and parameter names are exactly those of
Hugging Face's LlamaForCausalLM (`model.layers.0.self_attn.q_proj.weight`, ...), so saving and loading
HF directories needs no renaming table and a newcomer can read both codebases side by side.

The model knows nothing about devices, precision or parallelism: the trainer applies autocast,
DDP/FSDP and torch.compile from the outside (torchtitan's rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinychat.model.config import ModelConfig
from tinychat.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as HF does) so bf16 activations keep their scale exactly."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight.to(x.dtype) * y


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with HF's "linear" and "llama3" context-extension scalings."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":  # Llama 3.1: keep high frequencies, stretch low ones, blend in between
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by position; HF's rotate-half layout (first half pairs with second half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.q_proj = nn.Linear(cfg.d_model, cfg.q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.d_model, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d_model)
        cos: torch.Tensor,  # (B, 1, T, hd)
        sin: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.k_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        v = self.v_proj(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, S, hd)
        y = F.scaled_dot_product_attention(
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=cfg.n_kv_head != cfg.n_head,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.q_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, mask, is_causal):  # noqa: ANN001 - shapes as in Attention
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` part of an HF causal LM: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Model(nn.Module):
    """A causal language model. `Model(cfg)` builds it; `Model.from_pretrained(dir)` opens an HF directory or hub id."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.reset_parameters()

    # ---------------------------------------------------------------- initialisation and counting
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual projections scaled by 1/sqrt(2 n_layer) (GPT-2) so the
        residual stream's variance does not grow with depth; norms at one, biases at zero."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                p.normal_(0.0, std)
        self.inv_freq.copy_(rope_inv_freq(self.cfg))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied weight is counted once
        n += sum(getattr(m, "quantized_params", 0) for m in self.modules())  # integer weights (model/compress)
        if exclude_embeddings:
            emb = self.model.embed_tokens
            n -= emb.weight.numel() if isinstance(emb, nn.Embedding) else emb.quantized_params
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight in the forward pass (x3 with the backward), plus
        attention scores and values (2 * 2 * n_layer * n_head * head_dim * seq_len forward), the
        PaLM/nanoGPT accounting used for MFU."""
        cfg = self.cfg
        t = seq_len or cfg.max_seq_len
        matmul_params = self.num_params(exclude_embeddings=True)
        if cfg.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()  # the head still multiplies
        forward = 2 * matmul_params + 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * t
        return float(3 * forward if training else forward)

    # ---------------------------------------------------------------- forward
    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T) token ids
        cache: KVCache | None = None,
        n_new: torch.Tensor | None = None,  # (B,) real tokens per row when right-padded; default T
        rows: torch.Tensor | None = None,  # (B,) cache rows this call feeds; default all
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model): what the LM head, a reward head or a value head reads."""
        B, T = input_ids.shape
        if (virtual := getattr(self, "virtual_tokens", None)) is not None:  # prompt/prefix adapters (model/peft)
            cache = virtual.attach(self, cache, B, rows)
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the context window {self.cfg.max_seq_len}.")
            pos = torch.arange(T, device=input_ids.device)[None, :]
            mask, is_causal = None, True
        else:
            expect = cache.batch_size if rows is None else len(rows)
            assert expect == B, f"batch {B} != {expect} cache rows"
            pos = cache.begin(T, rows)
            mask, is_causal = cache.attention_mask()
        x = self.model.embed_tokens(input_ids)
        freqs = pos[..., None].float() * self.inv_freq.float()  # (B|1, T, hd/2), fp32 as in HF
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B|1, 1, T, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            cos, sin = cos.to(dt), sin.to(dt)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, mask, is_causal)
        if cache is not None:
            cache.advance(n_new if n_new is not None else torch.full((B,), T, device=input_ids.device))
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        n_new: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(input_ids, cache, n_new, rows))

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = self.model.norm.weight  # the activations' device and dtype (a quantized head's weight is integer)
        virtual = getattr(self, "virtual_tokens", None)  # a prompt/prefix adapter's tokens come first
        return KVCache(
            self.cfg,
            batch_size,
            min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len) + (virtual.num_tokens if virtual else 0),
            device=p.device,
            dtype=dtype or p.dtype,
        )

    # ---------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: str | None = None) -> Model:
        from tinychat.model.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        from tinychat.model.hf import save_pretrained

        save_pretrained(self, path, dtype=dtype)
