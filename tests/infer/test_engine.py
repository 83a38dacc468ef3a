"""The continuous-batching engine: same tokens alone or batched, slots reused and freed, per-request knobs."""

from __future__ import annotations

import copy
import json
import queue
import threading

import jsonschema
import pytest
import torch
import torch.nn.functional as F

from tinychat.errors import UserError
from tinychat.infer.engine import Delta, Done, Engine, EngineConfig, EngineOverloaded, GenerationRequest, collect
from tinychat.infer.generate import generate_ids
from tinychat.infer.sampling import SamplingParams
from tinychat.infer.structured import Grammars
from tinychat.model.packed import PackedLinear


def greedy(n: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, **kw)


def run(engine: Engine, req: GenerationRequest) -> tuple[list[dict], Done]:
    return collect(engine.submit(req), req.n)


@pytest.fixture
def engine(model, tok):
    e = Engine(model, tok, EngineConfig(max_num_seqs=16, prefill_chunk=16)).start()
    yield e
    e.stop()


def test_greedy_batched_equals_alone_and_reference(model, tok, prompts, engine):
    """16 requests at once (chunked prefill, mixed lengths) give exactly the tokens each gives alone."""
    ref = [generate_ids(model, [p], greedy(), set(tok.stop_ids))[0][0] for p in prompts]
    handles = [engine.submit(GenerationRequest(p, greedy())) for p in prompts]
    outs = [collect(h, 1)[0][0]["token_ids"] for h in handles]
    assert outs == ref
    assert engine.stats.free_slots == 16 and engine.stats.running_seqs == 0


def test_requests_join_and_leave_between_steps(model, tok, prompts):
    e = Engine(model, tok, EngineConfig(max_num_seqs=4, prefill_chunk=8)).start()
    try:
        order: queue.Queue = queue.Queue()
        first = threading.Event()

        def sink(name: str):
            def put(ev):
                order.put((name, ev))
                if name == "long" and isinstance(ev, Delta):
                    first.set()

            return put

        e.submit(GenerationRequest(prompts[0], greedy(150, stop_on_eos=False)), sink("long"))
        assert first.wait(10)
        long_prompt = sum(prompts, [])[:100]
        e.submit(GenerationRequest(long_prompt, greedy(3, stop_on_eos=False)), sink("late"))
        seen: list[tuple[str, object]] = []
        while sum(isinstance(ev, Done) for _, ev in seen) < 2:
            seen.append(order.get(timeout=20))
        names = [n for n, ev in seen if isinstance(ev, Done)]
        assert names == ["late", "long"]  # the late short request finished while the long one kept going
        late_first = next(i for i, (n, ev) in enumerate(seen) if n == "late")
        # the 100-token prompt was prefilled in chunks of 8, one per step, with a decode step of the
        # long request in between each: the long request kept streaming meanwhile
        assert sum(1 for n, _ in seen[:late_first] if n == "long") >= 10
        # more requests than slots: they queue, reuse freed slots, and all finish
        hs = [e.submit(GenerationRequest(p, greedy(i % 5 + 1, stop_on_eos=False))) for i, p in enumerate(prompts)]
        for i, h in enumerate(hs):
            choices, done = collect(h, 1)
            assert len(choices[0]["token_ids"]) == i % 5 + 1 and choices[0]["finish_reason"] == "length"
            assert done.completion_tokens == i % 5 + 1 and done.prompt_tokens == len(prompts[i])
        assert e.stats.free_slots == 4 and e.stats.queue_depth == 0
        assert e.stats.requests_finished == 18
    finally:
        e.stop()


def test_cancel_frees_the_slot(model, tok, prompts):
    e = Engine(model, tok, EngineConfig(max_num_seqs=1)).start()
    try:
        a = e.submit(GenerationRequest(prompts[0], greedy(200, stop_on_eos=False)))
        b = e.submit(GenerationRequest(prompts[1], greedy(5)))  # waits for the only slot
        events = iter(a)
        assert isinstance(next(events), Delta)
        b.cancel()
        a.cancel()
        rest = list(events)
        assert isinstance(rest[-1], Done) and rest[-1].error == "cancelled"
        assert len(rest) < 150  # it stopped early
        assert [ev for ev in b] == [Done(len(prompts[1]), 0, "cancelled")]
        choices, done = run(e, GenerationRequest(prompts[2], greedy(4, stop_on_eos=False)))
        assert len(choices[0]["token_ids"]) == 4 and done.error is None
        assert e.stats.requests_cancelled == 2 and e.stats.free_slots == 1
    finally:
        e.stop()


def test_queue_limit_refuses_beyond_it(model, tok, prompts):
    e = Engine(model, tok, EngineConfig(max_num_seqs=1, max_queue=2))  # not started: everything waits
    hs = [e.submit(GenerationRequest(p, greedy(2))) for p in prompts[:2]]
    with pytest.raises(EngineOverloaded):
        e.submit(GenerationRequest(prompts[2], greedy(2)))
    assert e.stats.requests_rejected == 1 and e.stats.queue_depth == 2
    e.start()
    try:
        assert all(collect(h, 1)[1].error is None for h in hs)
    finally:
        e.stop()


def test_n_choices_and_seeds_do_not_depend_on_the_batch(engine, prompts):
    one = run(engine, GenerationRequest(prompts[3], greedy(10)))[0][0]["token_ids"]
    three, done = run(engine, GenerationRequest(prompts[3], greedy(10), n=3))  # one prefill, KV copied
    assert [c["token_ids"] for c in three] == [one] * 3
    assert done.completion_tokens == sum(len(c["token_ids"]) + (c["finish_reason"] == "stop") for c in three)

    seeded = GenerationRequest(prompts[4], SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12, seed=7), n=2)
    alone = [c["token_ids"] for c in run(engine, seeded)[0]]
    assert alone[0] != alone[1]  # choices differ from each other
    others = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=12))) for p in prompts[:6]]
    again = [c["token_ids"] for c in run(engine, seeded)[0]]
    for h in others:
        collect(h, 1)
    assert again == alone


def test_logit_bias_ban_and_penalties(engine, prompts):
    choices, _ = run(engine, GenerationRequest(prompts[0], SamplingParams(max_new_tokens=6), logit_bias={42: 100.0}))
    assert choices[0]["token_ids"] == [42] * 6
    g = run(engine, GenerationRequest(prompts[0], greedy(8, stop_on_eos=False)))[0][0]["token_ids"]
    banned = run(engine, GenerationRequest(prompts[0], greedy(8, stop_on_eos=False), banned_ids=[g[0]]))[0][0]
    assert g[0] not in banned["token_ids"]
    fresh = run(engine, GenerationRequest(prompts[0], greedy(20, stop_on_eos=False, presence_penalty=2.0)))[0][0]
    assert len(set(fresh["token_ids"])) == 20  # a used token is pushed down by 2 nats: no repeats


def test_stop_strings_max_tokens_and_logprobs(engine, tok, prompts):
    full = run(engine, GenerationRequest(prompts[5], greedy(20, stop_on_eos=False)))[0][0]
    text = full["text"]
    stop = next(text[i : i + 3] for i in range(2, len(text) - 3) if text[i : i + 3].strip())
    cut = run(engine, GenerationRequest(prompts[5], greedy(20, stop_on_eos=False, stop=[stop])))[0][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"
    short = run(engine, GenerationRequest(prompts[5], greedy(5, stop_on_eos=False), logprobs=3))[0][0]
    assert short["finish_reason"] == "length" and short["token_ids"] == full["token_ids"][:5]
    for tid, lp in zip(short["token_ids"], short["logprobs"]):
        assert lp.token_id == tid and lp.top[0][0] == tid and lp.logprob == pytest.approx(lp.top[0][1])
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True) and len(lp.top) == 3


def test_json_schema_is_enforced(engine, model, tok, prompts):
    grammars = Grammars(tok, model.cfg.vocab_size)
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["city", "n"],
        "additionalProperties": False,
    }
    c = grammars.constraint(grammars.json_schema(schema))
    req = GenerationRequest(prompts[0], SamplingParams(max_new_tokens=40, seed=3), n=4, constraint=c)
    choices, _ = run(engine, req)
    for ch in choices:
        assert ch["finish_reason"] == "stop"
        jsonschema.validate(json.loads(ch["text"]), schema)
    with pytest.raises(UserError):
        grammars.json_schema({"type": "no-such-type"})


def test_forced_tool_call_streams_as_tool_calls(engine, model, tok, prompts):
    """A grammar forces <tool_call>{...}</tool_call>; the engine's stream turns it into a ToolCall event."""
    grammars = Grammars(tok, model.cfg.vocab_size)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"const": "Paris"}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    c = grammars.constraint(grammars.tool_call(tools, "get_weather", many=False))
    handle = engine.submit(GenerationRequest(prompts[0], greedy(60), constraint=c, parse_tools=True))
    events = list(handle)
    deltas = [ev for ev in events if isinstance(ev, Delta)]
    calls = [tc for d in deltas for tc in d.tool_calls]
    assert [(tc.name, json.loads(tc.arguments)) for tc in calls] == [("get_weather", {"city": "Paris"})]
    assert "".join(d.text for d in deltas) == ""
    assert deltas[-1].finish_reason == "tool_calls"
    forced = [t for d in deltas for t in d.token_ids]
    assert tok.decode(forced) == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_requests_that_can_never_run_are_refused(engine, prompts):
    with pytest.raises(UserError, match="context window is 256"):
        engine.submit(GenerationRequest(prompts[0], greedy(300)))
    with pytest.raises(UserError, match="n must be"):
        engine.submit(GenerationRequest(prompts[0], greedy(), n=17))
    with pytest.raises(UserError, match="empty"):
        engine.submit(GenerationRequest([], greedy()))
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.submit(GenerationRequest([10**6], greedy()))


def test_kv_memory_bounds_concurrency(model, tok, prompts):
    """Admission is bounded by KV blocks, not slots: with memory for ~2 worst-case sequences, at most 2 run."""
    e = Engine(model, tok, EngineConfig(max_num_seqs=16, block_size=16))
    per_seq = -(-(len(prompts[0]) + 60) // 16)
    e = Engine(model, tok, EngineConfig(max_num_seqs=16, kv_cache_mb=(2.5 * per_seq + 1) * e.cache.block_bytes / 2**20))
    assert e.kv_bytes == 0  # nothing is allocated before a sequence needs it
    peak = []
    hs = [e.submit(GenerationRequest(prompts[0], greedy(60, stop_on_eos=False)), peak.append) for _ in range(5)]
    e.start()
    try:
        while sum(isinstance(ev, Done) for ev in peak) < 5:
            assert e.stats.running_seqs <= 2
            threading.Event().wait(0.01)
        assert all(ev.error is None for ev in peak if isinstance(ev, Done)) and len(hs) == 5
        assert e.stats.kv_blocks_used == 0  # every block was returned
    finally:
        e.stop()
    with pytest.raises(UserError, match="do not fit in the engine's KV memory"):
        e.submit(GenerationRequest(prompts[0], greedy(200)))
    with pytest.raises(UserError, match="kv_cache_mb"):
        Engine(model, tok, EngineConfig(kv_cache_mb=0.001))


def test_embeddings_are_mean_pooled_and_normalised(engine, model, prompts):
    vecs = engine.embed(prompts[:3]).result(timeout=10)
    for p, v in zip(prompts[:3], vecs):
        with torch.no_grad():
            h = model.hidden_states(torch.tensor([p]))[0].mean(0)
        torch.testing.assert_close(torch.tensor(v), F.normalize(h, dim=-1), atol=1e-5, rtol=1e-4)


def test_packed_weights_are_optional_and_change_no_token(model, tok, prompts):
    """`pack_weights=False` leaves every projection an nn.Linear (no packed copy in memory); where the packed
    kernel runs, the default engine packs them, and both give the same greedy tokens."""
    from tinychat.model import Model, native

    outs = {}
    for pack in (False, True):
        m = Model(model.cfg).eval()
        m.load_state_dict(model.state_dict())
        e = Engine(m, tok, EngineConfig(max_num_seqs=4, pack_weights=pack)).start()
        try:
            outs[pack] = [run(e, GenerationRequest(p, greedy()))[0][0]["token_ids"] for p in prompts[:4]]
        finally:
            e.stop()
        packed = [mod for mod in m.modules() if isinstance(mod, PackedLinear)]  # o, down, head (fused ones: tuples)
        assert len(packed) == (2 * m.cfg.n_layer + 1 if pack and native.packed_linear() is not None else 0)
    assert outs[True] == outs[False]


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_a_16_bit_kv_cache_halves_the_memory_and_keeps_the_tokens(model, tok, prompts, kv):
    """--kv_cache_dtype: the pool holds half the bytes per token, and 16 requests batched (the decode kernel over
    scattered blocks, and the prefill's SDPA over the rounded keys) give what the fp32 cache gives: the same
    greedy tokens for nearly every prompt, and first-token logprobs within the 16-bit rounding."""
    ref_engine = Engine(model, tok, EngineConfig(max_num_seqs=16, prefill_chunk=16)).start()
    e = Engine(model, tok, EngineConfig(max_num_seqs=16, prefill_chunk=16, kv_cache_dtype=kv)).start()
    try:
        assert e.cache.dtype == getattr(torch, kv) and 2 * e.cache.block_bytes == ref_engine.cache.block_bytes
        outs = []
        for eng in (ref_engine, e):
            handles = [eng.submit(GenerationRequest(p, greedy(16), logprobs=5)) for p in prompts]
            outs.append([collect(h, 1)[0][0] for h in handles])
        same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(*outs))
        assert same >= 14, f"{same} of 16 prompts kept their greedy tokens"
        for a, b in zip(*outs):
            first_a, first_b = a["logprobs"][0], b["logprobs"][0]
            assert first_a.token_id == first_b.token_id
            assert abs(first_a.logprob - first_b.logprob) < 5e-3
    finally:
        e.stop()
        ref_engine.stop()
    with pytest.raises(UserError, match="kv_cache_dtype"):
        Engine(model, tok, EngineConfig(kv_cache_dtype="int8"))


def test_prefill_in_bf16_decodes_in_fp32_and_keeps_the_tokens(model, tok, prompts):
    """--prefill_dtype bfloat16: prompt chunks run on a bf16 copy of the weights, every decode step on the fp32
    model itself (its calls are one token a row), and 16 batched requests keep the fp32 engine's greedy tokens
    for nearly every prompt, their first-token logprobs within bf16 rounding."""
    ref_engine = Engine(model, tok, EngineConfig(max_num_seqs=16, prefill_chunk=16)).start()
    try:
        handles = [ref_engine.submit(GenerationRequest(p, greedy(16), logprobs=5)) for p in prompts]
        ref = [collect(h, 1)[0][0] for h in handles]
    finally:
        ref_engine.stop()
    # the model comes back fused and packed from ref_engine: its bf16 copy runs plain matmuls
    e = Engine(model, tok, EngineConfig(max_num_seqs=16, prefill_chunk=16, prefill_dtype="bfloat16"))
    assert not any(isinstance(m, PackedLinear) for m in e.prefill_model.modules())
    assert {p.dtype for p in e.prefill_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    widths: dict[str, list[int]] = {"fp32": [], "bf16": []}
    for name, m in (("fp32", model), ("bf16", e.prefill_model)):
        orig = m.hidden_states

        def spy(x, *a, _orig=orig, _name=name, **kw):
            widths[_name].append(x.shape[1])
            return _orig(x, *a, **kw)

        m.hidden_states = spy
    e.start()
    try:
        handles = [e.submit(GenerationRequest(p, greedy(16), logprobs=5)) for p in prompts]
        outs = [collect(h, 1)[0][0] for h in handles]
        same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(ref, outs))
        assert same >= 13, f"{same} of 16 prompts kept their greedy tokens"
        for a, b in zip(ref, outs):
            assert abs(a["logprobs"][0].logprob - b["logprobs"][0].logprob) < 5e-2
        assert max(widths["bf16"]) > 1 and set(widths["fp32"]) == {1}  # prompt chunks on bf16, decode rows on fp32
    finally:
        e.stop()
        del model.hidden_states
    with pytest.raises(UserError, match="prefill_dtype"):
        Engine(model, tok, EngineConfig(prefill_dtype="int8"))
    with pytest.raises(UserError, match="float32 model"):
        Engine(copy.deepcopy(model).to(torch.bfloat16), tok, EngineConfig(prefill_dtype="bfloat16"))
