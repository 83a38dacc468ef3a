"""The KV block manager and the engine's use of it: allocation, freeing, prefix hits, copy-on-write."""

from __future__ import annotations

import random
import time

import pytest

from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect
from tinychat.infer.engine.blocks import BlockManager
from tinychat.infer.generate import generate_ids
from tinychat.infer.sampling import SamplingParams


def test_allocation_prefers_consecutive_blocks_and_frees_at_once():
    m = BlockManager(10, 4)
    a = [m.allocate()]
    for _ in range(3):
        a.append(m.allocate(prefer=a[-1] + 1))
    assert a == [1, 2, 3, 4] and m.num_available == 5 and m.num_used == 4
    b = m.allocate(prefer=3)  # taken: falls back to the lowest free id
    assert b == 5
    m.release(a)
    assert m.num_available == 8 and m.num_used == 1
    assert m.allocate() == 1  # the lowest id first keeps the pool compact
    with pytest.raises(AssertionError):
        m.release([7])


def test_out_of_blocks_evicts_least_recently_used_cached_block():
    m = BlockManager(4, 2)
    tokens = [1, 2, 3, 4, 5]
    keys = m.chain(tokens, 2)
    held = [m.allocate(), m.allocate()]
    for b, k in zip(held, keys):
        m.register(b, k)
    m.release(held)
    assert m.num_available == 3 and m.num_used == 0  # cached blocks nobody holds can still be handed out
    assert m.match(tokens) == held  # a hit takes both (and holds them)
    m.release(held)
    assert m.allocate() == held[0]  # the oldest cached block is reused before the pool grows to block 3
    assert m.match(tokens) == []  # its prefix is gone, and so the chain breaks at block 0
    assert m.allocate() == held[1] and m.allocate() == 3  # the pool grows only once no cached block is left
    assert m.high_water == 4


def test_match_never_takes_the_last_token_and_needs_the_whole_chain():
    m = BlockManager(8, 2)
    t = [5, 6, 7, 8]
    blocks = [m.allocate(), m.allocate()]
    for b, k in zip(blocks, m.chain(t, 2)):
        m.register(b, k)
    assert m.match(t) == blocks[:1]  # 4 tokens = 2 full blocks, but the last token must run: 1 block
    assert m.match(t + [9]) == blocks
    assert m.match([0, 6, 7, 8, 9]) == []  # same second block, different first: another prefix
    m.release(blocks[:1] + blocks)


def test_copy_on_write():
    m = BlockManager(8, 4)
    mine = [m.allocate(), m.allocate()]
    other = list(mine)
    for b in other:
        m.acquire(b)
    src = m.writable(other, 1)
    assert src == mine[1] and other[1] not in mine and m.ref[mine[1]] == 1
    assert m.writable(other, 1) is None  # private now


# ---------------------------------------------------------------------------------------------- engine


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, stop_on_eos=False, **kw)


def test_prefix_hit_gives_the_same_tokens_and_skips_the_shared_blocks(model, tok, prompts):
    system = sum(prompts, [])[:70]  # a shared 70-token "system prompt"
    e = Engine(model, tok, EngineConfig(max_num_seqs=4, block_size=8)).start()
    try:
        outs = []
        for p in prompts[:3]:
            ids = system + p
            want = generate_ids(model, [ids], greedy(8))[0][0]
            outs.append((collect(e.submit(GenerationRequest(ids, greedy(8))), 1)[0][0]["token_ids"], want))
        assert all(got == want for got, want in outs)
        # the 2nd and 3rd requests took the system prompt's 8 full blocks (64 tokens) from the cache
        assert e.stats.prefix_hit_tokens >= 2 * 64
        assert e.stats.kv_blocks_used == 0
    finally:
        e.stop()


def test_no_prefix_caching_when_switched_off(model, tok, prompts):
    e = Engine(model, tok, EngineConfig(max_num_seqs=2, block_size=8, prefix_caching=False)).start()
    try:
        ids = sum(prompts, [])[:40]
        for _ in range(2):
            collect(e.submit(GenerationRequest(ids, greedy(3))), 1)
        assert e.stats.prefix_hit_tokens == 0
    finally:
        e.stop()


def test_n_choices_share_the_prompt_and_copy_on_write(model, tok, prompts):
    """n=3 prefills once; the choices share the prompt's blocks, copy the partial one, and decode alike."""
    e = Engine(model, tok, EngineConfig(max_num_seqs=4, block_size=8, prefix_caching=False))
    ids = sum(prompts, [])[:21]  # 2 full blocks + a partial one
    want = generate_ids(model, [ids], greedy(12))[0][0]
    h = e.submit(GenerationRequest(ids, greedy(12), n=3))
    e._drain(block=False)
    e.step()  # admit, prefill, first tokens, then one decode step that writes into the partial block
    blocks = [s.blocks for s in e.sched.running]
    assert blocks[0][:2] == blocks[1][:2] == blocks[2][:2]  # full prompt blocks shared
    assert len({b[2] for b in blocks}) == 3  # the partial block was copied before each choice wrote to it
    assert e.blocks.ref[blocks[0][0]] == 3
    e.start()
    try:
        choices, _ = collect(h, 3)
        assert [c["token_ids"] for c in choices] == [want] * 3
        assert e.stats.kv_blocks_used == 0
    finally:
        e.stop()


def test_cancel_mid_stream_frees_every_block(model, tok, prompts):
    e = Engine(model, tok, EngineConfig(max_num_seqs=8, block_size=8)).start()
    try:
        hs = [e.submit(GenerationRequest(p, greedy(150))) for p in prompts[:8]]
        its = [iter(h) for h in hs]
        for it in its:
            next(it)
        for _ in range(200):  # the gauge is updated at the end of the step that streamed the first tokens
            if e.stats.kv_blocks_used > 0:
                break
            time.sleep(0.01)
        assert e.stats.kv_blocks_used > 0
        for h in hs:
            h.cancel()
        for it in its:
            assert list(it)[-1].error == "cancelled"
        assert e.stats.kv_blocks_used == 0 and e.blocks.num_used == 0
    finally:
        e.stop()


@pytest.mark.parametrize("cached_prefix", [False, True])
def test_cancel_during_a_chunked_prefill_holds_no_block_and_fails_nothing(model, tok, prompts, cached_prefix):
    """Found by bench/soak.py: a request cancelled between two prefill chunks was freed (blocks returned),
    yet the next step still fed it its next chunk: it took new blocks nobody would return, or, when its
    first blocks had come from the prefix cache, indexed past its emptied block table and failed every
    request in the batch with an IndexError."""
    e = Engine(model, tok, EngineConfig(max_num_seqs=4, block_size=8, prefill_chunk=16))
    ids = sum(prompts, [])[:60]
    if cached_prefix:  # run one request to the end by hand: it leaves 4 full blocks in the prefix cache
        e.submit(GenerationRequest(ids[:40], greedy(2)))
        e._drain(block=False)
        while e.sched.waiting or e.sched.running:
            e.step()
        hit = e.blocks.match(ids)
        assert len(hit) >= 4
        e.blocks.release(hit)
    other = e.submit(GenerationRequest(prompts[0], greedy(6)))
    h = e.submit(GenerationRequest(ids, greedy(6)))
    e._drain(block=False)
    e.step()  # admits both; the long prompt is fed 16 tokens past what the cache gave it
    seq = next(s for s in e.sched.running if s.r.handle is h)
    assert seq.state == "prefill" and seq.computed < len(ids)
    h.cancel()
    e.step()
    e.start()
    try:
        assert list(h)[-1].error == "cancelled"
        choices, done = collect(other, 1)
        assert done.error is None and len(choices[0]["token_ids"]) == 6
        assert e.blocks.num_used == 0 and e.stats.requests_failed == 0
    finally:
        e.stop()


def test_idle_engine_releases_kv_memory(model, tok, prompts):
    e = Engine(model, tok, EngineConfig(max_num_seqs=2, idle_release_s=0.0)).start()
    try:
        collect(e.submit(GenerationRequest(prompts[0], greedy(4))), 1)
        for _ in range(100):
            if e.kv_bytes == 0:
                break
            e._wake()
            time.sleep(0.05)
        assert e.kv_bytes == 0
    finally:
        e.stop()


def test_the_used_count_follows_every_operation() -> None:
    """num_used is counted (free and evictable blocks subtracted), not scanned: under random allocations, shares,
    releases, cache hits and cache clears it equals the blocks whose reference count is positive."""
    rng = random.Random(0)
    for _ in range(50):
        m, held = BlockManager(32, 2), []
        for _ in range(200):
            op = rng.random()
            if op < 0.35 and m.num_available:
                held.append([m.allocate(prefer=rng.randint(0, 40) if rng.random() < 0.5 else None)])
            elif op < 0.55 and held:
                m.release(held.pop(rng.randrange(len(held))))
            elif op < 0.7 and held:
                m.register(rng.choice(held)[0], (None, (rng.randint(0, 3), rng.randint(0, 3))))
            elif op < 0.8 and held:
                b = rng.choice(held)
                m.acquire(b[0])
                held.append(list(b))
            elif op < 0.9:
                held += [[b] for b in m.match([rng.randint(0, 3) for _ in range(3)])]
            else:
                m.clear_cache()
            assert m.num_used == sum(1 for r in m.ref[1:] if r > 0)
