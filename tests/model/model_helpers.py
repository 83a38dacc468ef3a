"""Small randomised models and transformers configs shared by the model tests."""

from __future__ import annotations

import torch

from tinychat.model import Model, preset

V = 128
# a small transformers config (any Llama/Qwen family): 2 layers, GQA 4/2, 128 positions
HF_SMALL = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def small_model(router_scale: float = 0.05, **kw) -> Model:
    """A 2-layer tiny-preset model in eval mode with every weight perturbed (norms too, so a wrong norm or a
    skipped rotation cannot hide behind ones); `router_scale` spreads MoE routers so every expert gets tokens."""
    torch.manual_seed(0)
    base = dict(vocab_size=V, d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_ff=96, max_seq_len=32)
    model = Model(preset("tiny", **{**base, **kw})).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (router_scale if name.endswith("mlp.gate.weight") else 0.05))
    return model
