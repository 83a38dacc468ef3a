"""The fused head-and-loss (model/loss.py) equals the plain logits' cross-entropy: loss and gradients, in
fp32 and under bf16 autocast, with ignored targets and a vocabulary that spans several chunks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from tinychat.model import Model
from tinychat.model import loss as fused
from tinychat.model.config import ModelConfig


def _model() -> Model:
    torch.manual_seed(0)
    return Model(ModelConfig(vocab_size=500, d_model=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, d_ff=64))


def _grads(model: Model, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True])
def test_equals_the_logits_cross_entropy(monkeypatch: pytest.MonkeyPatch, bf16: bool):
    monkeypatch.setattr(fused, "CHUNK_LOGITS", 500 * 7)  # 7 rows a chunk: 40 rows take 6 chunks, the last short
    model = _model()
    x = torch.randint(0, 500, (4, 10))
    y = torch.randint(0, 500, (4, 10))
    y[0, :3] = -100
    y[2, 5] = -100

    def plain() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")

    def fused_loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x, targets=y)

    (l1, g1), (l2, g2) = _grads(model, plain), _grads(model, fused_loss)
    assert l2.dtype == torch.float32
    tol = 2e-2 if bf16 else 1e-4
    torch.testing.assert_close(l2, l1, rtol=tol, atol=tol)
    for name in g1:
        err = (g1[name] - g2[name]).norm() / g1[name].norm().clamp_min(1e-12)
        assert err < (3e-2 if bf16 else 1e-4), name


def test_all_targets_ignored_is_zero_loss_and_zero_gradient():
    model = _model()
    x = torch.randint(0, 500, (2, 6))
    loss = model(x, targets=torch.full((2, 6), -100))
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad.abs().max() == 0
