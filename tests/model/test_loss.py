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


def _assert_close_grads(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], tol: float) -> None:
    for name in want:
        err = (want[name] - got[name]).norm() / want[name].norm().clamp_min(1e-12)
        assert err < tol, name


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
    _assert_close_grads(g1, g2, 3e-2 if bf16 else 1e-4)


def test_all_targets_ignored_is_zero_loss_and_zero_gradient():
    model = _model()
    x = torch.randint(0, 500, (2, 6))
    loss = model(x, targets=torch.full((2, 6), -100))
    loss.backward()
    assert loss.item() == 0.0 and model.lm_head.weight.grad.abs().max() == 0


@pytest.mark.parametrize(("alpha", "bf16"), [(0.0, False), (0.5, False), (0.3, True)])
def test_soft_targets_equal_the_logits_topk_kl(monkeypatch: pytest.MonkeyPatch, alpha: float, bf16: bool):
    """A teacher's cached top-k through the fused head: alpha * CE + (1 - alpha) * KL over the K + 1 outcomes
    and both parts alone, with the gradients of the plain log-softmax path, across chunks, ignored targets,
    a target inside and outside the teacher's K, and the cache's int16 ids and fp16 log-probabilities."""
    monkeypatch.setattr(fused, "CHUNK_LOGITS", 500 * 7)
    model = _model()
    x = torch.randint(0, 500, (4, 10))
    y = torch.randint(0, 500, (4, 10))
    y[1, :4] = -100
    top = F.log_softmax(torch.randn(4, 10, 500) * 3, -1).topk(8, -1)
    y[3, 2] = top.indices[3, 2, 0]  # one target the teacher ranks first
    soft = (top.indices.to(torch.int16), top.values.half())
    out = {}

    def run(kind: str) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if kind == "fused":
                parts = model(x, targets=y, soft_targets=soft, alpha=alpha)
            else:
                parts = fused.summed_soft_ce(
                    model(x).flatten(0, 1), y.flatten(), tuple(t.flatten(0, 1) for t in soft), alpha
                )
        out[kind] = parts.detach()
        return parts[0]

    (_, g1), (_, g2) = _grads(model, lambda: run("plain")), _grads(model, lambda: run("fused"))
    tol = 2e-2 if bf16 else 1e-4
    torch.testing.assert_close(out["fused"], out["plain"], rtol=tol, atol=tol)
    assert out["fused"].dtype == torch.float32 and out["fused"][2] > 0
    torch.testing.assert_close(out["fused"][0], alpha * out["fused"][1] + (1 - alpha) * out["fused"][2])
    _assert_close_grads(g1, g2, 3e-2 if bf16 else 1e-4)


def test_soft_targets_of_the_student_itself_give_a_zero_kl_gradient():
    """A student already equal to its (full-vocabulary) teacher: KL 0, and at alpha 0 no gradient at all."""
    model = _model()
    x = torch.randint(0, 500, (2, 6))
    with torch.no_grad():
        top = F.log_softmax(model(x), -1).topk(500, -1)
    model.zero_grad()
    out = model(x, targets=torch.randint(0, 500, (2, 6)), soft_targets=(top.indices, top.values), alpha=0.0)
    out[0].backward()
    assert abs(out[2].item()) < 1e-3 and model.lm_head.weight.grad.abs().max() < 1e-4
