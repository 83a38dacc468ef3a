"""Decode-step matmuls over packed weights (model/packed_linear.cpp via model/packed.py): the kernel against
F.linear, a row's result independent of its batch, and what `pack_linears` swaps in a model and what it leaves.

The kernel is built with the machine's g++ on first use (cached per source and torch version); the tests that
need it skip where it cannot run (no AVX2/FMA), and the fallback tests run everywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinychat.model import Model, native, packed
from tinychat.model.config import preset
from tinychat.model.packed import PACKED_ROWS, PackedLinear, pack_linears

OP = native.packed_linear()
needs_kernel = pytest.mark.skipif(OP is None, reason="the packed matmul kernel cannot run on this machine")


def tiny_model(**kw: object) -> Model:
    torch.manual_seed(0)
    return Model(preset("tiny", vocab_size=301, n_layer=2, **kw)).eval()


@needs_kernel
@pytest.mark.parametrize("M", [0, 1, 2, 5, 6, 7, 13, 16, 64])
@pytest.mark.parametrize(("K", "N"), [(256, 512), (7, 1), (33, 15), (64, 17), (48, 100)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_f_linear(M: int, K: int, N: int, bias: bool) -> None:
    """Every row-tile size (1-6 and their sums), every panel tail (N % 16 from 1 to 15), with and without a
    bias: F.linear's result to float rounding."""
    torch.manual_seed(M * 1000 + K + N)
    w, x = torch.randn(N, K), torch.randn(M, K)
    b = torch.randn(N) if bias else None
    got = OP(x, torch.ops.tinychat.pack_linear_weight(w), b, N)
    assert got.shape == (M, N)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-5)


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_batch() -> None:
    """Each output is summed in the same order whatever the number of rows: bit for bit, a row alone, in a
    batch of 16 and at every place in it gives the same numbers (what keeps seeded engine outputs
    independent of their batch-mates)."""
    torch.manual_seed(1)
    w, x = torch.randn(300, 256), torch.randn(16, 256)
    p = torch.ops.tinychat.pack_linear_weight(w)
    whole = OP(x, p, None, 300)
    for i in range(16):
        assert torch.equal(OP(x[i : i + 1], p, None, 300)[0], whole[i])
    assert torch.equal(OP(x.flip(0), p, None, 300), whole.flip(0))


@needs_kernel
@pytest.mark.parametrize("M", [2, 5, 11, 12, 13, 16, 25, 64])
@pytest.mark.parametrize(("K", "N"), [(256, 512), (33, 15), (64, 17), (48, 100), (16, 48)])
def test_the_avx512_tiles_give_the_avx2_bits(M: int, K: int, N: int) -> None:
    """Where the CPU has AVX-512, calls of two rows or more take 12-row, two-panel tiles: every tile height (1-12 and
    their sums), an odd last panel and every panel tail must give exactly the AVX2 tiles' numbers (the same fused
    multiply-adds in the same order), so which path runs never changes an output. Elsewhere the switch stays off."""
    torch.manual_seed(M * 1000 + K + N)
    w, x, b = torch.randn(N, K), torch.randn(M, K), torch.randn(N)
    p = torch.ops.tinychat.pack_linear_weight(w)
    was = torch.ops.tinychat.packed_linear_avx512(True)
    try:
        wide = torch.ops.tinychat.packed_linear_avx512(True)  # True only where this CPU has AVX-512
        a = OP(x, p, b, N)
        torch.ops.tinychat.packed_linear_avx512(False)
        assert torch.equal(OP(x, p, b, N), a)
        torch.testing.assert_close(a, F.linear(x, w, b), atol=1e-4, rtol=1e-5)
        if not wide:
            assert not torch.ops.tinychat.packed_linear_avx512(True), "switched on without AVX-512"
    finally:
        torch.ops.tinychat.packed_linear_avx512(was)


@needs_kernel
def test_pack_linears_swaps_what_a_forward_calls_and_changes_nothing_else() -> None:
    """After fuse_projections: the fused q/k/v and gate/up, o/down and the tied head are packed; the
    projections the fused matmuls replaced are not; parameters, their names and the tie are the same objects,
    and the logits are the unpacked model's."""
    m = tiny_model().fuse_projections()
    x = torch.randint(0, 301, (2, 9))
    with torch.inference_mode():
        ref = m(x)
    before = {k: v.data_ptr() for k, v in m.state_dict().items()}
    pack_linears(m)
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    assert isinstance(attn.qkv_mod[0], PackedLinear) and isinstance(mlp.gate_up_mod[0], PackedLinear)
    assert all(isinstance(mod, PackedLinear) for mod in (attn.o_proj, mlp.down_proj, m.lm_head))
    assert all(type(mod) is nn.Linear for mod in (attn.q_proj, attn.k_proj, mlp.gate_proj, mlp.up_proj))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == before  # no copies, no new keys
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_only_inference_sized_fp32_calls_take_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to PACKED_ROWS rows without gradients; more rows, a call that needs gradients or bf16 autocast go
    to F.linear, and gradients reach the weight."""
    calls = []
    lin = PackedLinear(nn.Parameter(torch.randn(40, 32)), nn.Parameter(torch.randn(40)), OP)
    monkeypatch.setattr(lin, "op", lambda *a: calls.append(a[0].shape[0]) or OP(*a))
    with torch.no_grad():
        lin(torch.randn(PACKED_ROWS, 32))
        lin(torch.randn(4, 2, 32))
        lin(torch.randn(PACKED_ROWS + 1, 32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin(torch.randn(3, 32))
    assert calls == [PACKED_ROWS, 8]
    x = torch.randn(3, 32)
    lin(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, torch.ones(40, 1) * x.sum(0))
    assert calls == [PACKED_ROWS, 8]


@needs_kernel
def test_a_weight_changed_in_place_is_repacked() -> None:
    lin = PackedLinear(nn.Parameter(torch.randn(20, 16)), None, OP)
    x = torch.randn(2, 16)
    with torch.no_grad():
        lin.weight.mul_(-2)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), atol=1e-5, rtol=1e-5)


def test_models_the_kernel_does_not_serve_stay_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 weights keep nn.Linear, and so does every model where the kernel cannot run (here: switched off)."""
    m = tiny_model().to(torch.bfloat16).fuse_projections()
    pack_linears(m)
    assert not m.model.layers[0].self_attn.qkv_mod and type(m.lm_head) is nn.Linear
    monkeypatch.setattr(packed.native, "packed_linear", lambda: None)
    m = pack_linears(tiny_model().fuse_projections())
    assert not m.model.layers[0].self_attn.qkv_mod and type(m.model.layers[0].mlp.down_proj) is nn.Linear


@needs_kernel
def test_a_packed_model_moved_to_another_dtype_and_back_computes_with_its_new_weights() -> None:
    """`model.to(...)` replaces the fused q/k/v and gate/up buffers, which the fused packed modules (outside the
    module tree) read at every call: bf16 runs F.linear on the bf16 weights, and back in fp32 the next eager
    call repacks, so the logits are those of the same model never packed."""
    m = pack_linears(tiny_model().fuse_projections())
    ref = tiny_model().fuse_projections()
    x = torch.randint(0, 301, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(m.to(torch.bfloat16)(x), ref.to(torch.bfloat16)(x), atol=0, rtol=0)
        torch.testing.assert_close(m.float()(x), ref.float()(x), atol=1e-5, rtol=1e-5)
    assert "FusedPackedLinear" in repr(m.model.layers[0].self_attn.qkv_mod)
