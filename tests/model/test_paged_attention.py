"""The native paged decode attention (model/paged_attention.cpp via model/native.py): one query per row over
that row's keys where they lie in the pool, against SDPA over the gathered span it replaces.

The kernel is built with the machine's g++ on first use (cached per source and torch version); the tests that
need it skip where it cannot run (no AVX2/FMA), and the fallback tests run everywhere."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinychat.model import native
from tinychat.model.config import preset
from tinychat.model.kv_cache import PagedKVCache, PagedMeta, visible_keys

OP = native.paged_decode_attention()
needs_kernel = pytest.mark.skipif(OP is None, reason="the native attention kernel cannot run on this machine")


def gathered_sdpa(q, pk, pv, keys, positions):  # noqa: ANN001, ANN201 - the path the kernel replaces
    B, S = keys.shape
    ks = pk[keys.reshape(-1)].view(B, S, *pk.shape[1:]).transpose(1, 2)
    vs = pv[keys.reshape(-1)].view(B, S, *pv.shape[1:]).transpose(1, 2)
    return F.scaled_dot_product_attention(q, ks, vs, attn_mask=visible_keys(positions, S), enable_gqa=True)


@needs_kernel
@pytest.mark.parametrize(
    ("B", "H", "KV", "hd", "S"),
    [(1, 4, 2, 64, 16), (5, 4, 2, 64, 128), (3, 8, 8, 32, 40), (2, 6, 1, 8, 7), (6, 4, 4, 128, 37), (4, 2, 1, 96, 23)],
)
def test_kernel_equals_sdpa_over_the_gathered_span(B: int, H: int, KV: int, hd: int, S: int) -> None:
    """Scattered keys, rows of different lengths (one sees a single key, one sees all S; eight keys at a time
    and the tail), GQA and MHA and MQA, head sizes past one 64-float register block (128, 96 = 64 + 32): the same
    output as gathering each row's span and masking it for SDPA, to float rounding."""
    torch.manual_seed(0)
    P = 4 * S + 3
    pk, pv = torch.randn(P, KV, hd), torch.randn(P, KV, hd)
    keys = torch.stack([torch.randperm(P)[:S] for _ in range(B)])  # (B, S) positions anywhere in the pool
    positions = torch.randint(0, S, (B, 1))
    positions[-1, 0] = S - 1
    positions[0, 0] = 0  # (with B = 1 the one row sees a single key)
    q = torch.randn(B, 1, H, hd).transpose(1, 2)  # (B, H, 1, hd), not contiguous: as the model passes it
    got = OP(q, pk, pv, keys, positions, 1.0 / math.sqrt(hd))
    want = gathered_sdpa(q, pk, pv, keys, positions)
    assert got.shape == (B, H, 1, hd)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    keys2 = keys.clone()
    keys2[0, 1:] = 0  # row 0 sees one key: what lies past its position is never read
    torch.testing.assert_close(OP(q, pk, pv, keys2, positions, 1.0 / math.sqrt(hd))[0], got[0])


@needs_kernel
def test_peaked_scores_underflow_to_zero_weights_not_to_nans() -> None:
    """Scores hundreds apart (the vectorised exp's underflow past -87): weights of 0, the same output as SDPA."""
    torch.manual_seed(2)
    pk, pv = torch.randn(64, 2, 64), torch.randn(64, 2, 64)
    keys = torch.arange(40).view(1, 40).repeat(3, 1)
    positions = torch.tensor([[39], [17], [8]])
    q = 300 * torch.randn(3, 4, 1, 64)
    got = OP(q, pk, pv, keys, positions, 1 / 8)  # SDPA's scale for hd 64
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, gathered_sdpa(q, pk, pv, keys, positions), atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_pool_is_widened_as_it_is_read(dtype: torch.dtype) -> None:
    """--kv_cache_dtype: over float16 or bfloat16 pools the kernel computes what SDPA computes over the same
    rounded keys/values widened to float32 (to float rounding, not to the 16-bit rounding)."""
    if dtype == torch.float16 and "f16c" not in native.cpu_flags():
        pytest.skip("no F16C on this CPU")
    torch.manual_seed(3)
    B, H, KV, hd, S = 5, 4, 2, 64, 45
    P = 4 * S
    pk, pv = torch.randn(P, KV, hd).to(dtype), torch.randn(P, KV, hd).to(dtype)
    keys = torch.stack([torch.randperm(P)[:S] for _ in range(B)])
    positions = torch.tensor([[0], [7], [8], [30], [44]])
    q = torch.randn(B, 1, H, hd).transpose(1, 2)
    got = OP(q, pk, pv, keys, positions, 1.0 / math.sqrt(hd))
    want = gathered_sdpa(q, pk.float(), pv.float(), keys, positions)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="float32 query"):
        OP(q, pk, pv.float(), keys, positions, 1.0)  # pools of two dtypes


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attend_over_a_16_bit_pool_reads_the_same_through_the_kernel_and_the_gather(dtype: torch.dtype) -> None:
    """PagedKVCache.attend with a 16-bit pool and an fp32 query: the kernel and the gather + SDPA path (which widens
    the gathered span) agree, also for one row over consecutive blocks (read through the kernel rather than a
    widened copy of the view), and the new keys are stored rounded to the pool's dtype."""
    cfg = preset("tiny", vocab_size=64, n_layer=1)
    cache = PagedKVCache(cfg, 4, 16, "cpu", dtype)
    if cache.decode_kernel is None:
        pytest.skip("no kernel for this pool here")
    cache.ensure(16)
    cache.k[0].normal_(), cache.v[0].normal_()
    keys = torch.tensor([[40, 41, 42, 43, 8, 9, 10, 11], [20, 21, 22, 23, 0, 0, 0, 0]])
    positions = torch.tensor([[5], [2]])
    slots = keys.gather(1, positions).view(-1)
    meta = PagedMeta(positions, slots, keys, 0, 8, visible_keys(positions, 8))
    q = torch.randn(2, cfg.n_head, 1, cfg.head_dim)
    k, v = torch.randn(2, 2, cfg.n_kv_head, 1, cfg.head_dim)
    fast = cache.attend(0, q, k, v, meta)
    assert torch.equal(cache.k[0][slots], k.transpose(1, 2).reshape(2, cfg.n_kv_head, cfg.head_dim).to(dtype))
    one = PagedMeta(torch.tensor([[6]]), torch.tensor([30]), None, 24, 7, None)  # one row over consecutive blocks
    fast_one = cache.attend(0, q[:1], k[:1], v[:1], one)
    cache.decode_kernel = None
    torch.testing.assert_close(fast, cache.attend(0, q, k, v, meta), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast_one, cache.attend(0, q[:1], k[:1], v[:1], one), atol=2e-5, rtol=1e-4)


@needs_kernel
def test_a_key_outside_the_pool_is_an_error_not_a_read() -> None:
    pk = pv = torch.randn(8, 1, 8)
    q = torch.randn(1, 1, 1, 8)
    with pytest.raises(RuntimeError, match="outside the pool"):
        OP(q, pk, pv, torch.tensor([[3, 99]]), torch.tensor([[1]]), 1.0)


def test_the_cache_uses_it_only_where_it_computes_what_sdpa_would() -> None:
    """An fp32, fp16 or bf16 pool on the CPU with the plain visibility rule; not fp64, ALiBi or sliding windows
    (their layers bring masks of their own), a head size that 8 does not divide, or when the kernel is off. (A
    bf16 query, a model computing in bf16, takes SDPA: see attend.)"""
    cfg = preset("tiny", vocab_size=64, n_layer=2)
    assert (PagedKVCache(cfg, 4, 8, "cpu", torch.float32).decode_kernel is not None) == (OP is not None)
    assert (PagedKVCache(cfg, 4, 8, "cpu", torch.bfloat16).decode_kernel is not None) == (OP is not None)
    assert PagedKVCache(cfg, 4, 8, "cpu", torch.float64).decode_kernel is None
    assert (
        PagedKVCache(preset("tiny", vocab_size=64, position="alibi"), 4, 8, "cpu", torch.float32).decode_kernel is None
    )
    slid = preset("tiny", vocab_size=64, sliding_window=8)
    assert PagedKVCache(slid, 4, 8, "cpu", torch.float32).decode_kernel is None
    odd = preset("tiny", vocab_size=64, head_dim=12)  # the kernel's vectors are 8 floats
    assert PagedKVCache(odd, 4, 8, "cpu", torch.float32).decode_kernel is None


@needs_kernel
def test_attend_reads_the_same_through_the_kernel_and_the_gather() -> None:
    """PagedKVCache.attend for a decode step of three rows over scattered blocks: the kernel's output is the
    gather path's, and the new keys/values are written either way."""
    cfg = preset("tiny", vocab_size=64, n_layer=1)
    outs = []
    for kernel in (True, False):
        torch.manual_seed(1)
        cache = PagedKVCache(cfg, 4, 16, "cpu", torch.float32)
        cache.ensure(16)
        cache.k[0].normal_(), cache.v[0].normal_()
        if not kernel:
            cache.decode_kernel = None
        keys = torch.tensor(
            [[40, 41, 42, 43, 8, 9, 10, 11], [20, 21, 22, 23, 0, 0, 0, 0], [4, 5, 6, 7, 60, 61, 62, 63]]
        )
        positions = torch.tensor([[5], [2], [7]])
        slots = keys.gather(1, positions).view(-1)
        meta = PagedMeta(positions, slots, keys, 0, 8, visible_keys(positions, 8))
        q = torch.randn(3, cfg.n_head, 1, cfg.head_dim)
        k, v = torch.randn(2, 3, cfg.n_kv_head, 1, cfg.head_dim)
        outs.append((cache.attend(0, q, k, v, meta), cache.k[0][slots].clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1])
