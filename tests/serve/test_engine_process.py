"""`serve --engine_process`: the engine in a child process behaves as the engine in the server's process.

Each EngineProcess spawns an interpreter that imports torch and loads the model (a few seconds), so one
process serves most tests here (module scope)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tinychat.errors import UserError
from tinychat.infer.engine import Done, Engine, EngineConfig, GenerationRequest, collect
from tinychat.infer.sampling import SamplingParams
from tinychat.infer.structured import Grammars
from tinychat.model import Model
from tinychat.serve.cli import ServeConfig, build_engine
from tinychat.serve.engine_process import EngineProcess
from tinychat.tokenizer import Tokenizer

SLOTS = 4


def serve_config(model_dir: Path, **kw: object) -> ServeConfig:
    return ServeConfig(model=str(model_dir), max_num_seqs=SLOTS, prefill_chunk=64, dtype="float32", **kw)


@pytest.fixture(scope="module")
def remote(model_dir: Path) -> Iterator[EngineProcess]:
    eng = EngineProcess(build_engine, serve_config(model_dir), model_dir, "tiny", threads=1)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def local(model_dir: Path) -> Iterator[Engine]:
    model = Model.from_pretrained(str(model_dir), dtype=torch.float32)
    eng = Engine(model, Tokenizer.from_pretrained(model_dir), EngineConfig(max_num_seqs=SLOTS, prefill_chunk=64))
    yield eng.start()
    eng.stop()


def run_request(engine: Engine | EngineProcess, req: GenerationRequest) -> tuple[list[dict], Done]:
    return collect(engine.submit(req), req.n)


def requests(tok: Tokenizer) -> list[GenerationRequest]:
    ids = tok.render_chat([{"role": "user", "content": "Tell me about the river."}], add_generation_prompt=True).ids
    return [
        GenerationRequest(list(ids), SamplingParams(temperature=0.0, max_new_tokens=24)),
        GenerationRequest(list(ids), SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=24, seed=7), n=2),
        GenerationRequest(list(ids), SamplingParams(temperature=0.0, max_new_tokens=12), logprobs=2, banned_ids=[5]),
    ]


def test_outputs_equal_the_in_process_engine(remote, local, model_dir):
    tok = Tokenizer.from_pretrained(model_dir)
    assert (remote.context, remote.num_slots) == (local.context, local.num_slots)
    assert remote.model.cfg.vocab_size == local.model.cfg.vocab_size
    assert remote.model.num_params() == local.model.num_params()
    for req in requests(tok):
        (a, done_a), (b, done_b) = run_request(remote, req), run_request(local, req)
        # the same tokens; logprobs to float precision (the processes may use different kernel threads)
        assert [{k: v for k, v in c.items() if k != "logprobs"} for c in a] == [
            {k: v for k, v in c.items() if k != "logprobs"} for c in b
        ]
        for ca, cb in zip(a, b):
            assert [lp.token_id for lp in ca["logprobs"]] == [lp.token_id for lp in cb["logprobs"]]
            assert [lp.logprob for lp in ca["logprobs"]] == pytest.approx(
                [lp.logprob for lp in cb["logprobs"]], abs=1e-4
            )
        assert (done_a.prompt_tokens, done_a.completion_tokens, done_a.error) == (
            done_b.prompt_tokens,
            done_b.completion_tokens,
            done_b.error,
        )
        assert all(len(c["token_ids"]) > 0 for c in a)


def test_a_grammar_is_compiled_again_in_the_engine_process(remote, local, model_dir):
    tok = Tokenizer.from_pretrained(model_dir)
    grammars = Grammars(tok, local.model.cfg.vocab_size)
    grammar = grammars.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    ids = tok.render_chat([{"role": "user", "content": "json please"}], add_generation_prompt=True).ids
    outs = []
    for eng in (remote, local):
        req = GenerationRequest(list(ids), SamplingParams(temperature=0.0, max_new_tokens=40))
        req.constraint = grammars.constraint(grammar)
        outs.append(run_request(eng, req)[0])
    assert outs[0] == outs[1]
    assert outs[0][0]["text"].startswith('{"a"')


def test_refusals_are_raised_in_the_api_process(remote, local):
    for bad, match in [
        (GenerationRequest([1, 2, 3], n=SLOTS + 1), "n must be between 1"),
        (GenerationRequest([1] * 10, SamplingParams(max_new_tokens=10**6)), "the context window is"),
        (GenerationRequest([10**7]), "outside the vocabulary"),
        (GenerationRequest([1], adapter="nope"), "unknown adapter 'nope'"),
    ]:
        with pytest.raises(UserError, match=match) as remote_error:
            remote.submit(bad)
        with pytest.raises(UserError) as local_error:
            local.submit(bad)
        assert str(remote_error.value) == str(local_error.value)


def test_cancel_frees_the_request_and_metrics_cross_over(remote):
    before = remote.snapshot().stats.requests_cancelled
    handle = remote.submit(GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=400, stop_on_eos=False)))
    events = iter(handle)
    next(events)  # running
    handle.cancel()
    done = [ev for ev in events if isinstance(ev, Done)]
    assert len(done) == 1
    deadline = time.time() + 10
    while remote.snapshot().stats.running_seqs and time.time() < deadline:
        time.sleep(0.05)
    snap = remote.snapshot()
    assert snap.stats.requests_cancelled == before + 1
    assert (snap.stats.running_seqs, snap.stats.kv_blocks_used, snap.num_slots) == (0, 0, SLOTS)
    assert snap.stats.generation_tokens > 0 and snap.kv_blocks > 0


def test_embeddings_equal_the_in_process_engine(remote, local):
    batch = [[5, 6, 7], [8, 9]]
    a, b = remote.embed(batch).result(timeout=60), local.embed(batch).result(timeout=60)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    with pytest.raises(UserError, match="each input must have"):
        remote.embed([[]]).result(timeout=60)


def test_http_through_the_engine_process(remote, model_dir, serve_app):
    import openai

    from tinychat.serve.app import create_app

    base, server, thread = serve_app(create_app(remote, Tokenizer.from_pretrained(model_dir), "tiny"))
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "hello"}]
        whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
        chunks = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert whole.choices[0].message.content == streamed and whole.usage.completion_tokens > 0
        with pytest.raises(openai.BadRequestError, match="n must be at most"):
            client.chat.completions.create(model="tiny", messages=msgs, n=SLOTS + 1)
        import urllib.request

        assert json.loads(urllib.request.urlopen(base + "/health").read()) == {"status": "ok"}
        metrics = urllib.request.urlopen(base + "/metrics").read().decode()
        assert f"tinychat_kv_slots_total {SLOTS}" in metrics
        assert 'tinychat_requests_total{status="finished"}' in metrics
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class _SlowSubmit:
    """An engine whose submit takes `delay` seconds, as EngineProcess's does while the engine is mid-step."""

    def __init__(self, engine: Engine, delay: float, waits: bool) -> None:
        self._engine, self._delay, self.submit_waits = engine, delay, waits

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def submit(self, req: GenerationRequest, sink: object = None) -> object:
        time.sleep(self._delay)
        return self._engine.submit(req, sink)


@pytest.mark.parametrize("waits", [True, False])
def test_a_waiting_submit_does_not_stall_the_event_loop(local, model_dir, serve_app, waits):
    """While one request waits in submit, the server still answers others: the event loop is free when the
    engine says its submit waits (EngineProcess), and held when it claims not to (the control)."""
    import threading
    import urllib.request

    import openai

    from tinychat.serve.app import create_app

    base, server, thread = serve_app(
        create_app(_SlowSubmit(local, 1.5, waits), Tokenizer.from_pretrained(model_dir), "t")
    )
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        out: list[str] = []
        worker = threading.Thread(
            target=lambda: out.append(client.completions.create(model="t", prompt="hi", max_tokens=4).choices[0].text)
        )
        worker.start()
        time.sleep(0.4)  # the completion is inside submit now
        t0 = time.perf_counter()
        assert json.loads(urllib.request.urlopen(base + "/health", timeout=10).read()) == {"status": "ok"}
        health_s = time.perf_counter() - t0
        worker.join(timeout=30)
        assert len(out) == 1  # the waiting request itself was served
        assert (health_s < 0.8) if waits else (health_s > 0.9), health_s  # held: ~1.1 s
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_build_error_is_one_sentence_here(model_dir):
    with pytest.raises(UserError, match="--adapter expects NAME=DIR"):
        EngineProcess(build_engine, serve_config(model_dir, adapter=["no-equals-sign"]), model_dir, "tiny")


def test_an_engine_process_that_dies_answers_everything(model_dir):
    eng = EngineProcess(build_engine, serve_config(model_dir), model_dir, "tiny", threads=1)
    try:
        handle = eng.submit(GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=400, stop_on_eos=False)))
        events = iter(handle)
        next(events)
        eng._proc.kill()
        done = [ev for ev in events if isinstance(ev, Done)]
        assert len(done) == 1 and "the engine process exited" in done[0].error
        assert not eng.alive
        with pytest.raises(UserError, match="the engine is not running"):
            eng.submit(GenerationRequest([1, 2, 3]))
    finally:
        eng.stop()


def greedy(engine: Engine | EngineProcess, ids: list[int], adapter: str = "") -> str:
    req = GenerationRequest(list(ids), SamplingParams(temperature=0, max_new_tokens=8), adapter=adapter)
    return collect(engine.submit(req), 1)[0][0]["text"]


def test_adapters_loaded_and_unloaded_in_the_engine_process(model_dir, tmp_path):
    from adapter_helpers import make_lora

    root = tmp_path / "adapters"
    fox, dog = (make_lora(model_dir, root / name, seed=i, std=0.5) for i, name in enumerate(("fox", "dog"), 1))
    cfg = serve_config(model_dir, adapter=[f"fox={fox}"], adapter_updates=str(root), max_adapters=2, max_adapter_rank=8)
    eng = EngineProcess(build_engine, cfg, model_dir, "tiny", threads=1)
    tok = Tokenizer.from_pretrained(model_dir)
    ids = tok.encode("the quick brown fox")
    merged = {}
    for name, path in (("", model_dir), ("fox", fox), ("dog", dog)):
        local = Engine(Model.from_pretrained(str(path), dtype=torch.float32), tok, EngineConfig(max_num_seqs=1)).start()
        merged[name] = greedy(local, ids)
        local.stop()
    try:
        assert eng.adapters.served == ["fox"] and eng.adapters.updatable
        assert greedy(eng, ids, "fox") == merged["fox"]
        assert eng.load_adapter("dog", str(dog)).result(timeout=60) == 2
        assert eng.adapters.served == ["fox", "dog"] and eng.adapters.index["dog"][2] == dog
        assert greedy(eng, ids, "dog") == merged["dog"] and greedy(eng, ids) == merged[""]
        with pytest.raises(UserError, match="no LoRA adapter|adapter_config.json"):  # refused before installing
            eng.load_adapter("cat", str(tmp_path))
        with pytest.raises(UserError, match="in use|no free|already"):  # refused by the engine: both slots taken
            eng.load_adapter("fox", str(dog)).result(timeout=60)
        eng.unload_adapter("dog").result(timeout=60)
        assert eng.adapters.served == ["fox"]
        with pytest.raises(UserError, match="unknown adapter 'dog'"):
            eng.submit(GenerationRequest(list(ids), adapter="dog"))
        with pytest.raises(UserError, match="no adapter named 'dog'"):
            eng.unload_adapter("dog").result(timeout=60)
    finally:
        eng.stop()


class _LateEvents:
    """An engine whose events reach the server only when the request is done, all at once, as they do for a
    consumer that fell behind the engine (a busy HTTP process)."""

    def __init__(self, engine: Engine) -> None:
        self._engine, self.delivered = engine, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def submit(self, req: GenerationRequest, sink: object = None) -> object:
        import asyncio

        loop, held = asyncio.get_running_loop(), []  # called on the server's event loop (submit_waits is False)

        def hold(ev: object) -> None:
            held.append(ev)
            if isinstance(ev, Done):  # every event reaches the queue in one turn of the loop, none consumed between
                self.delivered += len(held)
                loop.call_soon_threadsafe(lambda: [sink(e) for e in held])  # type: ignore[operator]

        return self._engine.submit(req, hold)


def test_a_backlog_of_deltas_streams_as_one_chunk(local, model_dir, serve_app):
    """Deltas waiting for a busy consumer go out as one chunk per choice (app.events -> coalesce): the same
    text and usage as without streaming, in fewer chunks than the engine sent."""
    import openai

    from tinychat.serve.app import create_app

    late = _LateEvents(local)
    base, server, thread = serve_app(create_app(late, Tokenizer.from_pretrained(model_dir), "t"))
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "hello"}]
        args = dict(model="t", messages=msgs, max_tokens=12, temperature=0)
        whole = client.chat.completions.create(**args)
        late.delivered = 0
        chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(content) == whole.choices[0].message.content
        n = whole.usage.completion_tokens
        assert chunks[-1].usage.completion_tokens == n and n >= 3
        assert late.delivered >= n and len(content) == 1  # n deltas (or n - 1 and a stop) and a Done came together
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [whole.choices[0].finish_reason]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
