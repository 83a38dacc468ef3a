"""The compiled decode step (infer/compiled.py): the static-shape cache gives the eager cache's logits, and
compiled generation gives eager generation's tokens, greedy and sampled, for ragged batches."""

import importlib

import pytest
import torch

from tinychat.errors import UserError
from tinychat.infer import SamplingParams, generate_ids
from tinychat.infer.compiled import StaticKVCache, sampled_steps, static_forward, static_length
from tinychat.model import Model, ModelConfig


@pytest.fixture(scope="module")
def varied_model() -> Model:
    """Random weights large enough that greedy decoding does not repeat one token (it would hide errors)."""
    torch.manual_seed(0)
    dims = dict(d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_ff=128)
    cfg = ModelConfig(vocab_size=97, max_seq_len=200, init_std=0.3, **dims)
    return Model(cfg).eval().fuse_projections()


PROMPTS = [list(range(3, 20)), [5, 9], [40, 41, 42, 43, 44, 45, 46]]


def test_static_length_rounds_to_buckets_within_the_context():
    assert static_length(1, 512) == 128 and static_length(128, 512) == 128 and static_length(129, 512) == 256
    assert static_length(500, 300) == 300


@torch.no_grad()
@pytest.mark.parametrize("layout", ["rope", "sliding window", "alibi"])
def test_static_cache_matches_the_kv_cache_step_by_step(varied_model, layout):
    """Eager, no compile: ragged prefill then decode steps through the static buffer give the logits of the
    KVCache path at every real position (padded rows' junk is never seen), with the per-layer masks of
    sliding-window and ALiBi models too."""
    m, B = varied_model, len(PROMPTS)
    if layout != "rope":
        extra = {"sliding_window": 6, "arch": "qwen2"} if layout == "sliding window" else {"position": "alibi"}
        torch.manual_seed(1)
        m = Model(ModelConfig(**{**vars(varied_model.cfg), **extra})).eval().fuse_projections()
    lengths = torch.tensor([len(p) for p in PROMPTS])
    T0 = int(lengths.max())
    x = torch.zeros(B, T0, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        x[i, : len(p)] = torch.tensor(p)
    ref_cache = m.new_cache(B, max_len=T0 + 8)
    ref = m(x, ref_cache, n_new=lengths)
    cache = StaticKVCache(m.cfg, B, 128, torch.device("cpu"), torch.float32)
    got = static_forward(m, x, torch.arange(T0)[None].expand(B, T0), cache)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[i, :n], ref[i, :n], atol=1e-5, rtol=1e-5)
    nxt = ref[torch.arange(B), lengths - 1].argmax(-1)
    for step in range(6):
        a = m(nxt[:, None], ref_cache)[:, -1]
        b = static_forward(m, nxt[:, None], (lengths + step)[:, None], cache)[:, -1]
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        nxt = a.argmax(-1)


def test_compiled_generation_gives_the_eager_tokens(varied_model):
    greedy = SamplingParams(temperature=0, max_new_tokens=24, stop_on_eos=False)
    eager = generate_ids(varied_model, PROMPTS, greedy)
    assert len({tuple(r) for r in eager[0]}) == 3 and all(len(set(r)) > 3 for r in eager[0])  # varied output
    assert generate_ids(varied_model, PROMPTS, greedy, compiled=True) == eager
    sampled = SamplingParams(temperature=0.9, top_k=20, max_new_tokens=24, seed=5, stop_on_eos=False)
    assert generate_ids(varied_model, PROMPTS, sampled, compiled=True) == generate_ids(varied_model, PROMPTS, sampled)
    # another prompt set of the same batch size and bucket reuses the graph; stop ids still end rows
    other = [[7] * 30, [8, 9, 10], [11]]
    stop = {eager[0][0][3]}
    want = generate_ids(varied_model, other, greedy, stop)
    assert generate_ids(varied_model, other, greedy, stop, compiled=True) == want


@pytest.mark.parametrize("budget", [1, 2, 5, 10])
def test_greedy_steps_give_the_eager_tokens_and_stops(varied_model, budget, monkeypatch):
    """Plain greedy decoding runs GREEDY_STEPS tokens per compiled call (compiled.greedy_steps): for budgets
    below, at and past one call, with a stop id and a stop string (on_token) that end rows mid-call, the
    tokens, finish reasons and prompt lengths are eager decoding's; a budget that leaves the buffer no room
    for the extra steps falls back to one step per call with the same result."""
    from tinychat.infer.compiled import GREEDY_STEPS, greedy_steps

    greedy = SamplingParams(temperature=0, max_new_tokens=budget, stop_on_eos=False)
    free = generate_ids(varied_model, PROMPTS, greedy)[0]
    stop = {free[0][min(2, budget - 1)]}  # row 0 stops on its third token (or its last)

    def on_token(row: int, tok: int) -> bool:  # row 2 stops after its second token, as a stop string would
        return row == 2 and tok == free[2][min(1, budget - 1)]

    want = generate_ids(varied_model, PROMPTS, greedy, stop, on_token)
    gen = importlib.import_module("tinychat.infer.generate")  # the module (the package exports a function so named)
    calls = []
    monkeypatch.setattr(gen, "greedy_steps", lambda *a: calls.append(1) or greedy_steps(*a))
    assert generate_ids(varied_model, PROMPTS, greedy, stop, on_token, compiled=True) == want
    assert len(calls) == -(-(budget - 1) // GREEDY_STEPS)  # one call per GREEDY_STEPS tokens after the first
    long = [[3 + i % 90 for i in range(200 - budget - GREEDY_STEPS + 1)]]  # no room for the steps past the budget
    assert generate_ids(varied_model, long, greedy, compiled=True) == generate_ids(varied_model, long, greedy)


def test_compiled_int8_model_gives_the_eager_tokens(varied_model):
    """The weight-only int8 kernel (model/compress/quant.py) inside the compiled graph: same tokens as eager."""
    from tinychat.model.compress.quant import quantize_model

    m = Model(varied_model.cfg).eval()
    m.load_state_dict(varied_model.state_dict())
    quantize_model(m, 8).fuse_projections()
    greedy = SamplingParams(temperature=0, max_new_tokens=16, stop_on_eos=False)
    assert generate_ids(m, PROMPTS, greedy, compiled=True) == generate_ids(m, PROMPTS, greedy)


def test_compiled_refuses_what_it_does_not_run(varied_model, tiny_model_dir, tok, capsys):
    from tinychat.cli import main

    class Virtual:  # a prompt/prefix adapter's marker: compiled decoding does not attach virtual tokens
        num_tokens = 2

    m = Model(varied_model.cfg).eval()
    m.virtual_tokens = Virtual()
    with pytest.raises(UserError, match="prompt/prefix adapters"):
        generate_ids(m, [[1, 2]], SamplingParams(temperature=0, max_new_tokens=2), compiled=True)
    moe = Model(ModelConfig(**{**vars(varied_model.cfg), "n_experts": 4, "moe_d_ff": 64})).eval()
    with pytest.raises(UserError, match="mixture-of-experts"):
        generate_ids(moe, [[1, 2]], SamplingParams(temperature=0, max_new_tokens=2), compiled=True)
    from tinychat.infer.engine import Engine, EngineConfig

    with pytest.raises(UserError, match="mixture-of-experts"):
        Engine(moe, tok, EngineConfig(compile=True))
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--compile", "--speculative", "ngram"])
    assert rc == 2 and "--compile decodes without speculation" in capsys.readouterr().err


def test_engine_compiled_decode_gives_the_eager_tokens(varied_model, tok):
    """The serving engine's compiled decode (padded batch, bucketed keys, whole pool): the same tokens as its
    eager decode for requests that join and leave the batch, greedy and seeded sampling."""
    from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect

    sampled = SamplingParams(temperature=0.9, top_k=20, max_new_tokens=20, seed=3, stop_on_eos=False)
    reqs = [
        GenerationRequest(p, SamplingParams(temperature=0, max_new_tokens=n, stop_on_eos=False))
        for p, n in zip(PROMPTS + [[1] * 70], (20, 9, 14, 20))
    ]
    reqs.append(GenerationRequest(PROMPTS[0], sampled, n=2))
    outs = {}
    for compiled in (False, True):
        e = Engine(varied_model, tok, EngineConfig(max_num_seqs=2, prefill_chunk=16, compile=compiled)).start()
        try:
            handles = [e.submit(r) for r in reqs]
            outs[compiled] = [[c["token_ids"] for c in collect(h, r.n)[0]] for h, r in zip(handles, reqs)]
            assert e.stats.running_seqs == 0 and e.stats.free_slots == 2
            assert (e.cache.allocated == e.cache.num_blocks) == compiled  # the compiled path backs the whole pool
        finally:
            e.stop()
    assert [len(o[0]) for o in outs[False][:4]] == [20, 9, 14, 20]
    assert outs[True] == outs[False]


def test_engine_that_cannot_compile_says_so_at_start(varied_model, tok, monkeypatch):
    """A platform where compiling fails (no C++ compiler, say) gets one clear error when the engine starts."""
    from tinychat.infer.engine import Engine, EngineConfig, core

    def broken(*_a, **_k):
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(core, "decode_step", broken)
    e = Engine(varied_model, tok, EngineConfig(max_num_seqs=2, compile=True))
    with pytest.raises(UserError, match="compiling the decode step failed.*without --compile"):
        e.start()
    assert e.kv_bytes == 0 and e._thread is None  # nothing left allocated or running


def test_engine_multi_step_decode_gives_one_step_tokens(varied_model, tok, monkeypatch):
    """decode_steps > 1 (Engine._multi_decode, compiled.sampled_steps): several tokens per compiled call while
    nothing waits, sampled inside the graph from noise each row's generator drew beforehand. Greedy and
    seeded sampled requests (with logit bias, banned ids, n = 2, a stop string and token budgets that end
    rows mid-call) get exactly the tokens and finish reasons of one step per call; a request the graph
    cannot sample (top-k) runs one step per call; every block is returned afterwards."""
    from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect, core

    greedy = SamplingParams(temperature=0, max_new_tokens=23, stop_on_eos=False)
    seeded = SamplingParams(temperature=0.9, max_new_tokens=21, seed=11, stop_on_eos=False)
    reqs = [
        GenerationRequest(PROMPTS[0], greedy),
        GenerationRequest(PROMPTS[1], seeded, n=2, logit_bias={5: 3.0, 7: -100.0}, banned_ids=[9]),
        GenerationRequest(PROMPTS[2], SamplingParams(temperature=0.7, max_new_tokens=10, seed=2, stop_on_eos=False)),
    ]
    calls = []
    monkeypatch.setattr(core, "sampled_steps", lambda *a: calls.append(1) or sampled_steps(*a))
    outs = {}
    for steps in (1, 4):
        e = Engine(varied_model, tok, EngineConfig(max_num_seqs=4, compile=True, decode_steps=steps)).start()
        try:
            first = collect(e.submit(reqs[0]), 1)[0][0]  # alone: then a stop string that falls mid-call
            stop = tok.decode(first["token_ids"][9:11])
            with_stop = GenerationRequest(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=23, stop=[stop]))
            handles = [e.submit(r) for r in [*reqs, with_stop]]  # together: they join while others decode
            outs[steps] = [first] + [c for h, r in zip(handles, [*reqs, with_stop]) for c in collect(h, r.n)[0]]
            topk = GenerationRequest(PROMPTS[1], SamplingParams(temperature=0.9, top_k=5, max_new_tokens=8, seed=1))
            n_calls = len(calls)
            collect(e.submit(topk), 1)
            assert len(calls) == n_calls  # top-k: one step per call
            assert e.stats.running_seqs == 0 and e.blocks.num_used == len(e._prefix_blocks)
        finally:
            e.stop()
        assert (len(calls) > 0) == (steps > 1)
        calls.clear()
    assert [c["finish_reason"] for c in outs[4]] == ["length"] * 5 + ["stop"]
    assert [len(c["token_ids"]) for c in outs[4][:5]] == [23, 23, 21, 21, 10]
    assert 9 not in outs[4][2]["token_ids"] + outs[4][3]["token_ids"]  # banned
    assert outs[4] == outs[1]


def test_engine_decodes_eagerly_where_dynamo_refuses_to_recompile(varied_model, tok, monkeypatch):
    """A shape past dynamo's recompile limit (FailOnRecompileLimitHit under fullgraph) must not fail the running
    requests: those steps decode eagerly, with the eager engine's tokens."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect, core

    def refuse(*_a):  # noqa: ANN202 - what dynamo raises once a function has compiled too many graphs
        raise FailOnRecompileLimitHit("recompile limit reached")

    reqs = [GenerationRequest(p, SamplingParams(temperature=0, max_new_tokens=12, stop_on_eos=False)) for p in PROMPTS]
    outs = []
    for compiled in (False, True):
        e = Engine(varied_model, tok, EngineConfig(max_num_seqs=4, compile=compiled)).start()
        try:
            if compiled:  # after start, which compiled the batch-1 graphs
                monkeypatch.setattr(core, "decode_step", refuse)
                monkeypatch.setattr(core, "sampled_steps", refuse)
            handles = [e.submit(r) for r in reqs]
            outs.append([collect(h, 1)[0][0]["token_ids"] for h in handles])
            assert e.stats.requests_failed == 0
        finally:
            e.stop()
    assert [len(o) for o in outs[1]] == [12, 12, 12]
    assert outs[1] == outs[0]
