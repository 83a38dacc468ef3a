"""The Transformer's shapes, presets, counters and KV-cache equivalence."""

import pytest
import torch

from tinychat.model import Model, preset
from tinychat.model.config import PRESETS


def tiny(**kw) -> Model:
    torch.manual_seed(0)
    base = dict(vocab_size=300, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, d_ff=128)
    cfg = preset("tiny", **{**base, **kw})
    return Model(cfg).eval()


@pytest.mark.parametrize(
    "name,lo,hi", [("tiny", 5e6, 8e6), ("small", 25e6, 30e6), ("base", 100e6, 130e6), ("medium", 330e6, 370e6)]
)
def test_preset_sizes(name, lo, hi):
    with torch.device("meta"):
        m = Model(preset(name))
    assert lo <= m.num_params() <= hi, m.num_params()


def test_flops_counter_matches_6n_rule():
    m = tiny()
    n = m.num_params(exclude_embeddings=True) + m.lm_head.weight.numel()
    cfg = m.cfg
    assert m.flops_per_token(seq_len=1) == pytest.approx(6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim)
    assert m.flops_per_token(100, training=False) * 3 == m.flops_per_token(100)


def test_residual_init_is_scaled():
    torch.manual_seed(0)
    m = Model(preset("tiny"))
    q = m.model.layers[0].self_attn.q_proj.weight.std().item()
    o = m.model.layers[0].self_attn.o_proj.weight.std().item()
    assert q == pytest.approx(0.02, rel=0.05)
    assert o == pytest.approx(0.02 / (2 * m.cfg.n_layer) ** 0.5, rel=0.05)
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_bad_config_errors():
    from tinychat.errors import UserError

    with pytest.raises(UserError, match="n_kv_head"):
        preset("tiny", n_kv_head=3)
    with pytest.raises(UserError, match="unknown model preset"):
        preset("huge")


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=1), dict(qk_norm=False, arch="llama", tie_embeddings=False)])
def test_incremental_decoding_equals_full_forward(kw):
    m = tiny(**kw)
    x = torch.randint(0, 300, (3, 24))
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(3)
        pieces = [m(x[:, :10], cache), m(x[:, 10:15], cache)]  # prefill, then a chunk at an offset
        pieces += [m(x[:, t : t + 1], cache) for t in range(15, 24)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_ragged_batch_decodes_like_single_sequences():
    """Prompts of different lengths, right-padded in one batch, give each row's own logits."""
    m = tiny()
    torch.manual_seed(1)
    seqs = [torch.randint(0, 300, (n,)) for n in (5, 11, 8)]
    steps = [torch.randint(0, 300, (3,)) for _ in range(4)]
    with torch.no_grad():
        x = torch.zeros(3, 11, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = s
        cache = m.new_cache(3)
        lengths = torch.tensor([5, 11, 8])
        out = m(x, cache, n_new=lengths)
        batched_last = [out[i, lengths[i] - 1] for i in range(3)]
        batched_steps = [m(s[:, None], cache)[:, 0] for s in steps]
        for i, s in enumerate(seqs):
            full = m(torch.cat([s] + [st[i : i + 1] for st in steps])[None])[0]
            torch.testing.assert_close(batched_last[i], full[len(s) - 1], atol=1e-5, rtol=1e-5)
            for j in range(len(steps)):
                torch.testing.assert_close(batched_steps[j][i], full[len(s) + j], atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_context_errors():
    m = tiny()
    with pytest.raises(ValueError, match="context window"):
        m(torch.zeros(1, m.cfg.max_seq_len + 1, dtype=torch.long))
    cache = m.new_cache(1, max_len=8)
    with pytest.raises(ValueError, match="overflow"):
        m(torch.zeros(1, 9, dtype=torch.long), cache)


def test_bf16_autocast_close_to_fp32():
    m = tiny()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1


def test_every_preset_is_documented_in_presets_table():
    assert {"tiny", "small", "base", "medium"} <= set(PRESETS)


def test_cache_rows_feed_a_subset_of_slots():
    """A serving engine runs only active slots: feeding rows [2, 0] equals running those sequences alone."""
    m = tiny()
    torch.manual_seed(2)
    a, b = torch.randint(0, 300, (9,)), torch.randint(0, 300, (6,))
    with torch.no_grad():
        cache = m.new_cache(4)
        rows = torch.tensor([2, 0])
        x = torch.zeros(2, 9, dtype=torch.long)
        x[0], x[1, :6] = a, b
        first = m(x, cache, n_new=torch.tensor([9, 6]), rows=rows)
        assert cache.lengths.tolist() == [6, 0, 9, 0]
        nxt = m(torch.tensor([[5], [7]]), cache, rows=rows)[:, 0]
        only_a = m(torch.cat([a, torch.tensor([5])])[None])[0]
        only_b = m(torch.cat([b, torch.tensor([7])])[None])[0]
    torch.testing.assert_close(first[0, 8], only_a[8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first[1, 5], only_b[5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[0], only_a[9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[1], only_b[6], atol=1e-5, rtol=1e-5)
    cache.reset([2])
    assert cache.lengths.tolist() == [7, 0, 0, 0]
