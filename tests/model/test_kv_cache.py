"""The caches as attention backends: paged blocks (consecutive or scattered) and fused projections give
the logits of a plain full forward; caches live in the compute dtype."""

from __future__ import annotations

import pytest
import torch

from tinychat.model import Model, preset
from tinychat.model.kv_cache import PagedKVCache, PagedMeta


def tiny(**kw) -> Model:
    torch.manual_seed(0)
    base = dict(vocab_size=300, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, d_ff=128)
    return Model(preset("tiny", **{**base, **kw})).eval()


def paged_meta(tables: list[list[int]], starts: list[int], n: list[int], T: int, bs: int, view: bool) -> PagedMeta:
    """What the engine builds: rows right-padded to T tokens, padded keys sent to scratch block 0."""
    B = len(tables)
    pos = torch.tensor([[s + t for t in range(T)] for s in starts])
    slot = lambda b, p: tables[b][p // bs] * bs + p % bs  # noqa: E731
    slots = torch.tensor([slot(b, starts[b] + t) if t < n[b] else 0 for b in range(B) for t in range(T)])
    S = max(s + k for s, k in zip(starts, n))
    keys = [[slot(b, p) if p < starts[b] + n[b] else 0 for p in range(S)] for b in range(B)]
    keys = None if view else torch.tensor(keys)
    mask = torch.arange(S)[None, None, None, :] <= pos[:, None, :, None]
    return PagedMeta(pos, slots, keys, tables[0][0] * bs, S, mask)


def test_fused_projections_give_the_same_logits():
    """GQA, multi-query and Llama-style (no QK-norm, untied) models alike."""
    for kw in (dict(), dict(n_kv_head=1), dict(qk_norm=False, arch="llama", tie_embeddings=False)):
        m, x = tiny(**kw), torch.randint(0, 300, (2, 12))
        with torch.no_grad():
            ref, w = m(x), m.model.layers[0].self_attn.q_proj.weight.clone()
            torch.testing.assert_close(m.fuse_projections()(x), ref, atol=1e-5, rtol=1e-5)
            # the projections' weights are views of the fused matrix: an in-place update reaches both
            m.model.layers[0].self_attn.q_proj.weight.add_(1.0)
            torch.testing.assert_close(m.model.layers[0].self_attn.qkv_weight[: w.shape[0]], w + 1.0)


def test_fused_projections_with_bias():
    m = tiny(arch="qwen2", qk_norm=False, qkv_bias=True)
    for layer in m.model.layers:
        torch.nn.init.normal_(layer.self_attn.q_proj.bias)
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(m.fuse_projections()(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("view", [True, False])
def test_paged_cache_prefill_chunks_and_decode_equal_full_forward(view):
    m = tiny()
    bs = 4
    torch.manual_seed(3)
    x = torch.randint(0, 300, (13,))
    table = [1, 2, 3, 4] if view else [5, 2, 7, 3]  # consecutive blocks read in place; scattered ones gathered
    cache = PagedKVCache(m.cfg, bs, 8, "cpu", torch.float32)
    cache.ensure(8)
    with torch.no_grad():
        full = m(x[None])[0]
        out = [m(x[None, :6], cache, meta=paged_meta([table], [0], [6], 6, bs, view))[0]]
        out.append(m(x[None, 6:10], cache, meta=paged_meta([table], [6], [4], 4, bs, view))[0])
        for t in range(10, 13):
            out.append(m(x[None, t : t + 1], cache, meta=paged_meta([table], [t], [1], 1, bs, view))[0])
    torch.testing.assert_close(torch.cat(out), full, atol=1e-5, rtol=1e-5)


def test_paged_cache_ragged_batch_equals_each_sequence_alone():
    m = tiny()
    bs = 4
    torch.manual_seed(4)
    a, b = torch.randint(0, 300, (7,)), torch.randint(0, 300, (3,))
    tables = [[3, 1], [6, 2]]
    cache = PagedKVCache(m.cfg, bs, 8, "cpu", torch.float32)
    cache.ensure(8)
    with torch.no_grad():
        x = torch.zeros(2, 7, dtype=torch.long)
        x[0], x[1, :3] = a, b
        first = m(x, cache, meta=paged_meta(tables, [0, 0], [7, 3], 7, bs, False))
        nxt = m(torch.tensor([[5], [9]]), cache, meta=paged_meta(tables, [7, 3], [1, 1], 1, bs, False))
        alone_a = m(torch.cat([a, torch.tensor([5])])[None])[0]
        alone_b = m(torch.cat([b, torch.tensor([9])])[None])[0]
    torch.testing.assert_close(first[0], alone_a[:7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first[1, :3], alone_b[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[0, 0], alone_a[7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[1, 0], alone_b[3], atol=1e-5, rtol=1e-5)


def test_pool_grows_on_demand_and_is_released():
    m = tiny()
    cache = PagedKVCache(m.cfg, 16, 64, "cpu", torch.bfloat16)
    assert cache.nbytes == 0
    cache.ensure(3)
    small = cache.nbytes
    assert small == 4 * cache.block_bytes  # doubling from a floor of 4 blocks
    cache.k[0][5] = 1.0
    cache.v[1][7] = 2.0
    cache.ensure(9)
    assert cache.nbytes == 9 * cache.block_bytes and len(cache.k) == m.cfg.n_layer
    assert float(cache.k[0][5, 0, 0]) == 1.0 and float(cache.v[1][7, 0, 0]) == 2.0  # grown, contents kept
    cache.copy_block(0, 2)  # copy-on-write copies the block in every layer
    assert float(cache.k[0][2 * 16 + 5, 0, 0]) == 1.0 and float(cache.v[1][2 * 16 + 7, 0, 0]) == 2.0
    cache.release()
    assert cache.nbytes == 0 and cache.k == []


def test_cache_is_in_the_compute_dtype():
    m = tiny()
    assert m.new_cache(1).k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = m.new_cache(1)
        with torch.no_grad():
            m(torch.randint(0, 300, (1, 5)), c)
    assert c.k.dtype == torch.bfloat16


def test_fused_model_converts_with_to_and_saves_without_the_fused_copies(tmp_path):
    m = tiny()
    x = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        ref = tiny().to(torch.bfloat16)(x)
        m.fuse_projections()
        assert not any("qkv" in k or "gate_up" in k for k in m.state_dict())
        m.to(torch.bfloat16)
        torch.testing.assert_close(m(x), ref, atol=0.05, rtol=0.05)
    m.save_pretrained(str(tmp_path))  # the projections are plain tensors again after .to()
    again = Model.from_pretrained(str(tmp_path))
    torch.testing.assert_close(again.model.layers[0].self_attn.k_proj.weight, m.model.layers[0].self_attn.k_proj.weight)


@pytest.mark.parametrize(("h", "kv", "t"), [(4, 2, 1), (4, 4, 3), (6, 1, 2)])
def test_matmul_attention_equals_sdpa(h: int, kv: int, t: int) -> None:
    """The compiled decode step's attention (two matmuls and a softmax, query heads of a group stacked) against
    SDPA with GQA, for per-row masks that hide different key spans."""
    from tinychat.model.kv_cache import matmul_attention, visible_keys

    torch.manual_seed(0)
    B, S, hd = 3, 20, 16
    q, k, v = torch.randn(B, h, t, hd), torch.randn(B, kv, S, hd), torch.randn(B, kv, S, hd)
    mask = visible_keys(
        torch.tensor([[5 + i for i in range(t)], [11, 12, 13][:t], [19 - t + 1 + i for i in range(t)]]), S
    )
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv != h)
    torch.testing.assert_close(matmul_attention(q, k, v, mask), ref, rtol=1e-5, atol=1e-5)
