"""The decoder-only Transformer of the Llama / Qwen2 / Qwen3 family.

Pre-norm blocks (RMSNorm), rotary position embeddings, grouped-query attention through
torch's scaled_dot_product_attention, a SwiGLU MLP. Module and parameter names are exactly those of
Hugging Face's LlamaForCausalLM (`model.layers.0.self_attn.q_proj.weight`, ...), so saving and loading
HF directories needs no renaming table and a newcomer can read both codebases side by side.

The model knows nothing about devices, precision or parallelism: the trainer applies autocast,
DDP/FSDP and torch.compile from the outside (torchtitan's rule).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from tinychat.model.config import ModelConfig
from tinychat.model.kv_cache import CacheMeta, KVCache, PagedKVCache, PagedMeta, sdpa
from tinychat.model.loss import linear_cross_entropy, summed_ce, summed_soft_ce
from tinychat.model.moe import MoE, inactive_params
from tinychat.model.positions import base_inv_freq, layer_masks, rope_attention_factor, rope_kind, yarn_inv_freq


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as HF does) so bf16 activations keep their scale exactly."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:  # one fused op: the same arithmetic, fewer kernels
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight.to(x.dtype) * y


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with HF's "linear", "llama3" and "yarn" context-extension scalings.

    ALiBi models rotate nothing: zero frequencies make cos 1 and sin 0, so the rotation is the identity.
    """
    inv_freq = base_inv_freq(cfg)
    if cfg.position == "alibi":
        return torch.zeros_like(inv_freq)
    scaling = cfg.rope_scaling or {}
    kind = rope_kind(cfg)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "yarn":
        return yarn_inv_freq(cfg)
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


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half rotary embedding, x * cos + rotate_half(x) * sin, with rotate-half's sign folded
    into the sine table (`rope_tables`): one roll and one fused multiply-add, three kernels instead of six
    on the decode hot path."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def rope_tables(
    pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (B|1, 1, T, hd) for positions (B|1, T), computed in fp32 as HF does (see `rotate`);
    `scale` multiplies both (YaRN's attention temperature)."""
    freqs = pos[..., None].float() * inv_freq.float()  # (B|1, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return torch.cat((cos, cos), -1)[:, None].to(dtype), torch.cat((-sin, sin), -1)[:, None].to(dtype)


def add_adapters(y: torch.Tensor, x: torch.Tensor, mods: tuple[nn.Module, ...], adapters: object) -> torch.Tensor:
    """y, the output of the projections `mods` for x (side by side when they are fused), plus each one's
    per-row adapter update: a model serving several LoRA adapters in one batch (model/peft/multi_lora.py)
    wraps its projections in modules with an `add_to(y, x, adapters, group)`, and `adapters` (the forward
    call's argument, built by the caller like the attention metadata) says which adapter each row uses.
    y is this call's fresh output and is updated in place."""
    if adapters is None:
        return y
    if all(hasattr(m, "add_to") for m in mods):  # the whole group at once (one matmul pair)
        return mods[0].add_to(y, x, adapters, mods)
    col = 0
    for m in mods:
        width = m.weight.shape[0]
        if hasattr(m, "add_to"):
            part = y[..., col : col + width]
            part.copy_(m.add_to(part.contiguous(), x, adapters))
        col += width
    return y


def _fusable(m: nn.Module) -> bool:
    """A projection computing F.linear(x, m.weight, m.bias) (a multi-adapter one adds its update afterwards)."""
    return type(m) is nn.Linear or hasattr(m, "add_to")


def _fuse_integer(mods: tuple[nn.Module, ...]) -> tuple[nn.Module, ...]:
    """(one module computing all of `mods`,) for integer projections that can share one kernel call
    (compress/quant.py `QuantLinear.concat`: int8, whose weights then become views of the fused one), else ().

    A tuple, not a submodule: the fused module stays out of the module tree, so state_dict, the quantized
    files and named_modules see only the projections themselves, as in an unfused model."""
    concat = getattr(type(mods[0]), "concat", None)
    if concat is None or any(type(m) is not type(mods[0]) for m in mods):
        return ()
    fused = concat(mods)
    return () if fused is None else (fused,)


def layer_metas(
    cfg: ModelConfig,
    pos: torch.Tensor,  # (B|1, T) positions of the new tokens
    cache: KVCache | PagedKVCache | None,
    meta: CacheMeta | PagedMeta | None,
    dtype: torch.dtype,
) -> list[CacheMeta | PagedMeta | None]:
    """Each layer's attention metadata: the call's own for plain models (SDPA keeps its mask-free fast
    paths), or a copy carrying that layer's sliding-window / ALiBi mask (model/positions.py). Keys sit at
    positions 0..span-1 of their row in both cache layouts, so one rule covers cache-less, contiguous and
    paged calls."""
    if cfg.plain_masks:
        return [meta] * cfg.n_layer
    if cache is None:
        T = pos.shape[-1]
        masks = layer_masks(cfg, pos, None, True, dtype, T)
        return [CacheMeta(pos, None, 0, T, m, c) for m, c in masks]
    assert meta is not None
    masks = layer_masks(cfg, pos, meta.mask, meta.is_causal, dtype, meta.span)
    return [dataclasses.replace(meta, mask=m, is_causal=c) for m, c in masks]


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
        # set by fuse() for inference; buffers so .to() moves them, non-persistent so files never see them
        self.qkv_weight: torch.Tensor | None
        self.qkv_bias: torch.Tensor | None
        self.qk_weight: torch.Tensor | None  # (H + KV, hd): q_norm's weight per query head, then k_norm's
        for name in ("qkv_weight", "qkv_bias", "qk_weight"):
            self.register_buffer(name, None, persistent=False)
        # one module computing the fused q/k/v: int8 (fuse(), _fuse_integer) or packed fp32 (model/packed.py)
        self.qkv_mod: tuple[nn.Module, ...] = ()

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d_model)
        cos: torch.Tensor,  # (B, 1, T, hd)
        sin: torch.Tensor,  # signed, see rope_tables
        cache: KVCache | PagedKVCache | None,
        meta: CacheMeta | PagedMeta | None,
        adapters: object = None,  # which LoRA adapter each row uses (add_adapters); None: the weights as they are
    ) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, KV = cfg.n_head, cfg.n_kv_head
        if self.qkv_weight is not None or self.qkv_mod:  # fused for inference (fuse_projections): one matmul,
            # one norm, one rope
            qkv = self.qkv_mod[0](x) if self.qkv_mod else F.linear(x, self.qkv_weight, self.qkv_bias)
            qkv = add_adapters(qkv, x, (self.q_proj, self.k_proj, self.v_proj), adapters)
            qkv = qkv.view(B, T, H + 2 * KV, cfg.head_dim)
            qk, v = qkv[:, :, : H + KV], qkv[:, :, H + KV :].transpose(1, 2)
            if cfg.qk_norm:  # in fp32 as RMSNorm computes it (no casts when the activations are fp32 already)
                qk = qk if qk.dtype == torch.float32 else qk.float()
                qk = F.rms_norm(qk, (cfg.head_dim,), eps=cfg.norm_eps).to(v.dtype) * self.qk_weight.to(v.dtype)
            qk = rotate(qk.transpose(1, 2), cos, sin)  # (B, H + KV, T, hd)
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = add_adapters(self.q_proj(x), x, (self.q_proj,), adapters).view(B, T, H, cfg.head_dim)
            k = add_adapters(self.k_proj(x), x, (self.k_proj,), adapters).view(B, T, KV, cfg.head_dim)
            v = add_adapters(self.v_proj(x), x, (self.v_proj,), adapters).view(B, T, KV, cfg.head_dim)
            if cfg.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is None:  # meta, when given, carries a sliding-window or ALiBi mask (layer_metas)
            mask, causal = (None, True) if meta is None else (meta.mask, meta.is_causal)
            y = sdpa(q, k, v, mask, causal)
        else:  # the cache writes k/v (B, n_kv, T, hd) and attends over what each query may see
            y = cache.attend(self.layer_idx, q, k, v, meta)
        y = y.transpose(1, 2).reshape(B, T, cfg.q_dim)
        return add_adapters(self.o_proj(y), y, (self.o_proj,), adapters)

    @torch.no_grad()
    def fuse(self) -> bool:
        """Inference only: one (q+k+v, d) matmul instead of three; q/k/v_proj's weights become views of it,
        so memory does not grow and in-place updates stay in sync (until a later .to() copies them apart).
        Skipped (False) when a projection is not a plain nn.Linear (LoRA-adapted, int4); a multi-adapter one
        fuses too (its per-row update is added after the fused matmul, add_adapters), and int8 ones fuse into
        one integer matmul (_fuse_integer)."""
        mods = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv_weight is not None or self.qkv_mod:
            return True
        if all(_fusable(m) for m in mods):
            self.qkv_weight, self.qkv_bias = _fuse_linears(mods)
        else:
            self.qkv_mod = _fuse_integer(mods)
            if not self.qkv_mod:
                return False
        if self.cfg.qk_norm:
            cfg = self.cfg
            w = (self.q_norm.weight.expand(cfg.n_head, -1), self.k_norm.weight.expand(cfg.n_kv_head, -1))
            self.qk_weight = torch.cat(w)
        return True


def _fuse_linears(mods: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate Linear weights (and biases) along the output dim; each module's parameter becomes a view."""
    out = []
    for name in ("weight", "bias"):
        parts = [getattr(m, name) for m in mods]
        if parts[0] is None:
            out.append(None)
            continue
        fused, row = torch.cat([p.detach() for p in parts]), 0
        for m, p in zip(mods, parts):
            setattr(m, name, nn.Parameter(fused[row : row + p.shape[0]], requires_grad=p.requires_grad))
            row += p.shape[0]
        out.append(fused)
    return out[0], out[1]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = d_ff or cfg.d_ff  # an MoE expert is a narrower MLP
        self.gate_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.gate_up_weight: torch.Tensor | None
        self.gate_up_bias: torch.Tensor | None
        for name in ("gate_up_weight", "gate_up_bias"):  # set by fuse(), as in Attention
            self.register_buffer(name, None, persistent=False)
        self.gate_up_mod: tuple[nn.Module, ...] = ()  # as Attention.qkv_mod

    def forward(self, x: torch.Tensor, adapters: object = None) -> torch.Tensor:  # adapters: as in Attention
        if self.gate_up_weight is not None or self.gate_up_mod:  # fused for inference: one matmul for gate and up
            fused = self.gate_up_mod
            gate_up = fused[0](x) if fused else F.linear(x, self.gate_up_weight, self.gate_up_bias)
            gate, up = add_adapters(gate_up, x, (self.gate_proj, self.up_proj), adapters).chunk(2, dim=-1)
        else:
            gate = add_adapters(self.gate_proj(x), x, (self.gate_proj,), adapters)
            up = add_adapters(self.up_proj(x), x, (self.up_proj,), adapters)
        h = F.silu(gate) * up
        return add_adapters(self.down_proj(h), h, (self.down_proj,), adapters)

    @torch.no_grad()
    def fuse(self) -> bool:
        """Inference only: gate and up in one matmul (as Attention.fuse)."""
        mods = (self.gate_proj, self.up_proj)
        if self.gate_up_weight is None and not self.gate_up_mod:
            if all(_fusable(m) for m in mods):
                self.gate_up_weight, self.gate_up_bias = _fuse_linears(mods)
            else:
                self.gate_up_mod = _fuse_integer(mods)
        return self.gate_up_weight is not None or bool(self.gate_up_mod)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg, MLP) if cfg.n_experts else MLP(cfg)

    def forward(self, x, cos, sin, cache, meta, adapters=None):  # noqa: ANN001 - shapes as in Attention
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta, adapters)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h) if adapters is None or not isinstance(self.mlp, MLP) else self.mlp(h, adapters))


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
        matmul_params -= inactive_params(cfg)  # MoE: only the k routed experts multiply
        forward = 2 * matmul_params + 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * t
        return float(3 * forward if training else forward)

    # ---------------------------------------------------------------- forward
    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T) token ids
        cache: KVCache | PagedKVCache | None = None,
        n_new: torch.Tensor | None = None,  # KVCache: (B,) real tokens per row when right-padded; default T
        rows: torch.Tensor | None = None,  # KVCache: (B,) cache rows this call feeds; default all
        meta: CacheMeta | PagedMeta | None = None,  # the call's attention metadata (a PagedKVCache needs it)
        adapters: object = None,  # several LoRA adapters served at once: each row's (model/peft/multi_lora.py)
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model): what the LM head, a reward head or a value head reads.

        With a KVCache and no `meta`, the cache plans the call and is committed after it (batched
        generation); a serving engine builds `meta` itself from its block tables and keeps its own lengths.
        A prompt/prefix adapter (model/peft) attaches its virtual tokens' keys/values to the cache first."""
        B, T = input_ids.shape[:2]  # (B, T, d_model) hidden states on a pipeline stage (train/pipeline.py)
        if (virtual := getattr(self, "virtual_tokens", None)) is not None:  # prompt/prefix adapters (model/peft)
            cache = virtual.attach(self, cache, B, rows)
        own = cache is not None and meta is None  # the cache plans its own call (KVCache, model/peft's PrefixCache)
        assert not (own and isinstance(cache, PagedKVCache)), "a paged cache needs the call's metadata (meta=)"
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the context window {self.cfg.max_seq_len}.")
            pos = torch.arange(T, device=input_ids.device)[None, :]
        else:
            if own:
                expect = cache.batch_size if rows is None else len(rows)
                assert expect == B, f"batch {B} != {expect} cache rows"
                meta = cache.plan(T, rows)
            pos = meta.positions
        x = self.model.embed_tokens(input_ids)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = rope_tables(pos, self.inv_freq, dt, rope_attention_factor(self.cfg))  # YaRN scales both
        for layer, layer_meta in zip(self.model.layers, layer_metas(self.cfg, pos, cache, meta, dt)):
            x = layer(x, cos, sin, cache, layer_meta, adapters)
        if own:
            cache.commit(meta, n_new)
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | PagedKVCache | None = None,
        n_new: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        meta: CacheMeta | PagedMeta | None = None,
        adapters: object = None,
        targets: torch.Tensor | None = None,  # (B, T) next-token ids, -100 = no loss
        last: torch.Tensor | None = None,  # (B,) the one position per row whose logits are wanted
        soft_targets: tuple[torch.Tensor, torch.Tensor] | None = None,  # (B, T, K) a teacher's top-k ids, log-probs
        alpha: float = 1.0,  # with soft_targets: the cross-entropy's weight, 1 - alpha the KL's
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size), or (B, vocab_size) at the positions `last` (a prefill reads only its
        last token's); with `targets`, the summed cross-entropy against them instead (an fp32 scalar),
        computed in row chunks without materialising the logits where the head is a plain Linear
        (model/loss.py); with `soft_targets` too, (3,): the summed alpha * CE + (1 - alpha) * KL to the
        teacher's top-k, then CE and KL alone (distillation). Through forward, so DDP, FSDP and compile
        wrappers see the call."""
        h = self.hidden_states(input_ids, cache, n_new, rows, meta, adapters)
        if last is not None:
            return self.lm_head(h[torch.arange(h.shape[0], device=h.device), last])
        if targets is None:
            return self.lm_head(h)
        soft = None if soft_targets is None else tuple(t.flatten(0, 1) for t in soft_targets)
        w = self.lm_head.weight
        plain = parametrize.type_before_parametrizations(self.lm_head) is nn.Linear  # not LoRA or int8
        if plain and type(w) in (torch.Tensor, nn.Parameter):  # not a DTensor
            return linear_cross_entropy(h.flatten(0, 1), w, targets.flatten(), soft, alpha)
        if soft is not None:
            return summed_soft_ce(self.lm_head(h).flatten(0, 1), targets.flatten(), soft, alpha)
        return summed_ce(self.lm_head(h), targets)

    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: autocast's when it is on, else the norms' (a quantized head's weight is integer)."""
        dev = self.model.norm.weight.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.model.norm.weight.dtype

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A KVCache on the model's device, in the compute dtype (so decoding never casts the cached span);
        a prompt/prefix adapter's virtual tokens take the first positions of every row."""
        virtual = getattr(self, "virtual_tokens", None)
        return KVCache(
            self.cfg,
            batch_size,
            min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len) + (virtual.num_tokens if virtual else 0),
            device=self.model.norm.weight.device,
            dtype=dtype or self.compute_dtype(),
        )

    def fuse_projections(self) -> Model:
        """For inference: q/k/v and gate/up each in one matmul (see Attention.fuse). Saving stays possible
        only after a fresh load; do not train a fused model with optimisers that replace parameters."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            if isinstance(layer.mlp, MLP):
                layer.mlp.fuse()
        return self

    # ---------------------------------------------------------------- files
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device: str | None = None) -> Model:
        from tinychat.model.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None) -> None:
        from tinychat.model.hf import save_pretrained

        save_pretrained(self, path, dtype=dtype)
