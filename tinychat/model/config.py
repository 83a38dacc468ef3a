"""Model hyper-parameters and the size presets.

One dataclass covers the Llama, Qwen2 and Qwen3 families because they differ only in switches: Qwen2
adds q/k/v biases, Qwen3 adds per-head RMSNorm on queries and keys and lets head_dim differ from
d_model / n_head. `arch` picks the Hugging Face class name a saved directory carries, so transformers
opens it with no conversion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from tinychat.config import field
from tinychat.errors import UserError

Arch = Literal["llama", "qwen2", "qwen3", "mistral"]


@dataclass
class ModelConfig:
    preset: str = field("tiny", help="size preset the other fields start from (tiny, small, base, medium)")
    arch: Arch = field("qwen3", help="HF family the saved directory declares: llama, qwen2, qwen3 or mistral")
    vocab_size: int = field(8192, help="set from the tokenizer when a run trains one")
    d_model: int = field(256, help="hidden size")
    n_layer: int = field(6)
    n_head: int = field(4)
    n_kv_head: int = field(2, help="key/value heads; divides n_head (1 = multi-query attention)")
    head_dim: int = field(64, help="per-head size, independent of d_model (Qwen3 allows it)")
    d_ff: int = field(768, help="SwiGLU intermediate size")
    max_seq_len: int = field(512, help="context window in tokens")
    rope_theta: float = field(10000.0)
    rope_scaling: dict[str, Any] | None = field(
        None, help="HF rope_scaling/rope_parameters (linear, yarn, llama3); `tinychat extend-context` writes it"
    )
    position: Literal["rope", "alibi"] = field(
        "rope", help="rope, or alibi: linear attention biases instead of rotations (no HF family reads it)"
    )
    sliding_window: int = field(0, help="keys a query sees in sliding-window layers, itself included (0 = off)")
    max_window_layers: int = field(0, help="layers below this index keep full attention (Qwen2/Qwen3 semantics)")
    norm_eps: float = field(1e-6)
    qk_norm: bool = field(True, help="RMSNorm on each query/key head (Qwen3)")
    qkv_bias: bool = field(False, help="bias on q/k/v projections (Qwen2)")
    o_bias: bool = field(False, help="bias on the output projection (Llama attention_bias)")
    mlp_bias: bool = field(False, help="bias on the MLP projections (Llama mlp_bias)")
    tie_embeddings: bool = field(True, help="share the input embedding and the output head")
    init_std: float = field(0.02)
    # mixture of experts (model/moe.py): the experts and their widths ...
    n_experts: int = field(0, help="routed experts per MoE layer (0 = dense MLP); saved as Qwen3-MoE / Qwen2-MoE")
    experts_per_token: int = field(
        2, help="experts each token is routed to (top-k); k experts of d_ff / k cost the FLOPs of one dense MLP"
    )
    moe_d_ff: int = field(0, help="intermediate size of each routed expert (0 = d_ff // experts_per_token)")
    shared_expert_d_ff: int = field(0, help="a shared expert every token passes through (Qwen2-MoE; 0 = none)")
    # ... and the router: its weights and the two auxiliary losses the training loop adds
    norm_topk_prob: bool = field(True, help="renormalise the top-k routing weights to sum to one")
    moe_aux_coef: float = field(
        0.01, help="load-balancing auxiliary loss weight (Switch Transformer; config.json's router_aux_loss_coef)"
    )
    moe_z_coef: float = field(0.001, help="router z-loss weight (ST-MoE): keeps router logits small")
    bos_token_id: int | None = field(None)
    eos_token_id: int | list[int] | None = field(None)
    pad_token_id: int | None = field(None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}.")
        if self.n_head % self.n_kv_head:
            raise UserError(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head}).")
        if self.head_dim % 2:
            raise UserError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.sliding_window < 0 or self.max_window_layers < 0:
            raise UserError("model.sliding_window and model.max_window_layers must be >= 0.")
        if self.n_experts < 0 or (self.n_experts and not 0 < self.experts_per_token <= self.n_experts):
            raise UserError(
                f"model.experts_per_token ({self.experts_per_token}) must be between 1 and model.n_experts "
                f"({self.n_experts})."
            )
        if self.moe_d_ff < 0 or self.shared_expert_d_ff < 0:
            raise UserError("model.moe_d_ff and model.shared_expert_d_ff must be >= 0.")

    @property
    def expert_d_ff(self) -> int:
        """Each routed expert's intermediate size: by default d_ff / k, so k active experts cost one dense MLP."""
        return self.moe_d_ff or max(1, self.d_ff // self.experts_per_token)

    def sliding(self, layer: int) -> bool:
        """Does layer `layer` attend through the sliding window?"""
        return self.sliding_window > 0 and layer >= self.max_window_layers

    @property
    def plain_masks(self) -> bool:
        """Every layer sees what the call's own metadata allows: no ALiBi biases, no sliding-window layers."""
        return self.position != "alibi" and not any(self.sliding(i) for i in range(self.n_layer))

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim


# Sizes are quoted for the default 8192-token vocabulary (base/medium assume larger vocabularies).
PRESETS: dict[str, dict[str, Any]] = {
    # ~6.8M parameters; the CPU speedrun (configs/cpu-tiny.toml) trains it with n_layer = 3 (4.5M; d_model 192 if slow)
    "tiny": dict(d_model=256, n_layer=6, n_head=4, n_kv_head=2, head_dim=64, d_ff=768, max_seq_len=512),
    # ~29M parameters: a CPU model for an hour, or a GPU smoke test
    "small": dict(d_model=512, n_layer=8, n_head=8, n_kv_head=4, head_dim=64, d_ff=1536, max_seq_len=1024),
    # ~115M parameters with a 32k vocabulary: GPT-2-small class
    "base": dict(
        d_model=768,
        n_layer=12,
        n_head=12,
        n_kv_head=4,
        head_dim=64,
        d_ff=2560,
        max_seq_len=2048,
        vocab_size=32768,
    ),
    # ~354M parameters with a 50k vocabulary: GPT-2-medium class, for GPUs
    "medium": dict(
        d_model=1024,
        n_layer=24,
        n_head=16,
        n_kv_head=8,
        head_dim=64,
        d_ff=3072,
        max_seq_len=2048,
        vocab_size=50304,
        rope_theta=500000.0,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A ModelConfig of a named size, with any field overridden (e.g. vocab_size from a tokenizer)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}.")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise UserError(f"unknown model option(s) {', '.join(bad)}.")
    return ModelConfig(**{**PRESETS[name], **overrides, "preset": name})


def resolve(cfg: ModelConfig, **overrides: Any) -> ModelConfig:
    """Put cfg.preset underneath the fields a user changed from the defaults, then apply `overrides`.

    The dataclass defaults are the tiny preset, so `--model.preset small --model.n_layer 10` gives
    small with 10 layers. (A field set explicitly to its tiny default value also yields to the preset.)
    """
    default = ModelConfig()
    changed = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name != "preset" and getattr(cfg, f.name) != getattr(default, f.name)
    }
    return preset(cfg.preset, **{**changed, **overrides})
