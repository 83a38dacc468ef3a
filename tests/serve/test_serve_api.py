"""The server through the official `openai` client: every endpoint, streaming, n, stop, seed, tools, JSON."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

MODEL_NAME = "tiny-test"  # as the live-server fixture names it

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a"],
            "additionalProperties": False,
        },
    },
}


def chat(client, **kw):
    args = {"model": MODEL_NAME, "messages": USER, "max_tokens": 12, "temperature": 0.0, **kw}
    return client.chat.completions.create(**args)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_chat_usage_and_stream_agree(client, live):
    r = chat(client)
    prompt_ids = live.tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=True)
    assert r.object == "chat.completion" and r.model == MODEL_NAME
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")

    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content  # greedy: the stream says exactly what the whole answer said
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_n_seed_and_stop(client):
    a = chat(client, n=3, temperature=1.0, seed=123, max_tokens=10)
    assert [c.index for c in a.choices] == [0, 1, 2]
    b = chat(client, n=3, temperature=1.0, seed=123, max_tokens=10)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # reproducible
    assert len({c.message.content for c in a.choices}) > 1  # but the choices differ
    c = chat(client, n=3, temperature=1.0, seed=124, max_tokens=10)
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]
    assert 3 <= a.usage.completion_tokens <= 30  # usage adds up every choice's tokens

    streamed = chat(client, n=2, temperature=1.0, seed=123, max_tokens=10, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [x.message.content for x in a.choices[:2]]

    full = chat(client, max_tokens=20, temperature=1.0, seed=9).choices[0].message.content
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
    cut = chat(client, max_tokens=20, temperature=1.0, seed=9, stop=[stop, "never-appears"])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens or len(content) == r.usage.completion_tokens - 1
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy picks the top token
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token


def test_logprobs_of_a_reply_that_ends_at_once(client, live):
    """A choice whose first sample is the end of text has no tokens: asked-for logprobs are empty, not null."""
    end_now = {str(t): 100 for t in live.tok.stop_ids}
    r = chat(client, logprobs=True, max_tokens=4, logit_bias=end_now)
    assert r.choices[0].message.content == "" and r.choices[0].logprobs.content == []
    c = client.completions.create(model=MODEL_NAME, prompt="a fox", max_tokens=4, logprobs=2, logit_bias=end_now)
    assert c.choices[0].text == "" and c.choices[0].logprobs.tokens == [] == c.choices[0].logprobs.token_logprobs
    assert chat(client, max_tokens=4, logit_bias=end_now).choices[0].logprobs is None  # not asked for


def test_tool_calls(client):
    r = chat(
        client,
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    r = chat(client, tools=[WEATHER, ADD], tool_choice="required", temperature=1.0, seed=5, max_tokens=120)
    assert r.choices[0].finish_reason == "tool_calls"
    for call in r.choices[0].message.tool_calls:
        schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)

    # streamed: the same call arrives as tool_calls deltas (id and name first, then the arguments)
    stream = chat(
        client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, stream=True, max_tokens=60
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = c["id"] or d.id
                c["name"] += d.function.name or ""
                c["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])

    # none: the tools are described but no call can be made
    r = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=20)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"


def test_a_forced_call_cut_by_max_tokens_is_a_partial_call(client):
    """finish_reason "length" with the function's name and the arguments written so far, never <tool_call> text."""
    forced = {"type": "function", "function": {"name": "get_weather"}}
    partial = 0
    for max_tokens in range(1, 24):
        r = chat(client, tools=[WEATHER, ADD], tool_choice=forced, max_tokens=max_tokens)
        choice = r.choices[0]
        assert "<tool_call>" not in (choice.message.content or ""), (max_tokens, choice.message)
        if choice.finish_reason == "tool_calls":
            break
        assert choice.finish_reason == "length" and not choice.message.content
        for call in choice.message.tool_calls or []:
            assert call.function.name == "get_weather" and call.id.startswith("call_")
            assert call.function.arguments[:1] in ("", "{")  # the JSON object as far as it got
            partial += 1
    assert partial > 0  # some limit fell inside the arguments
    stream = chat(client, tools=[WEATHER], tool_choice=forced, stream=True, max_tokens=max_tokens - 1)
    chunks = [ch for chunk in stream for ch in chunk.choices]
    assert not "".join(ch.delta.content or "" for ch in chunks) and chunks[-1].finish_reason == "length"
    assert [d.function.name for ch in chunks for d in ch.delta.tool_calls or [] if d.function.name] == ["get_weather"]


def test_json_schema_and_json_object(client):
    schema = {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Rome"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "sunny": {"type": "boolean"},
        },
        "required": ["city", "days", "sunny"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": True}}
    r = chat(client, response_format=fmt, n=3, temperature=1.0, seed=1, max_tokens=60)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)

    r = chat(client, response_format={"type": "json_object"}, n=4, temperature=1.0, seed=2, max_tokens=200)
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    assert finished, "no choice closed its object within 200 tokens"
    for c in finished:
        assert isinstance(json.loads(c.message.content), dict)


def test_text_completions(client, live):
    r = client.completions.create(model=MODEL_NAME, prompt="The quick brown", max_tokens=6, temperature=0, echo=True)
    assert r.object == "text_completion" and r.choices[0].text.startswith("The quick brown")
    assert r.usage.prompt_tokens == len(live.tok.encode("The quick brown"))
    r2 = client.completions.create(model=MODEL_NAME, prompt=["a fox", "a dog"], max_tokens=4, n=2, logprobs=2)
    assert [c.index for c in r2.choices] == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) for c in r2.choices)
    ids = live.tok.encode("lazy dog")
    r3 = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=3, temperature=0)
    assert r3.usage.prompt_tokens == len(ids)
    stream = client.completions.create(
        model=MODEL_NAME, prompt="The quick brown", max_tokens=6, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert "The quick brown" + text == r.choices[0].text


def test_embeddings(client, live):
    r = client.embeddings.create(model=MODEL_NAME, input=["hello world", "the lazy dog", "hello world"])
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and len(vecs[0]) == live.engine.model.cfg.d_model
    assert sum(x * x for x in vecs[0]) == pytest.approx(1.0, abs=1e-4)
    assert vecs[0] == pytest.approx(vecs[2], abs=1e-6) and vecs[0] != pytest.approx(vecs[1], abs=1e-3)
    assert r.usage.prompt_tokens == sum(len(live.tok.encode(t)) for t in ["hello world", "the lazy dog"] * 1) + len(
        live.tok.encode("hello world")
    )
    floats = client.embeddings.create(model=MODEL_NAME, input="hello world", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vecs[0], abs=1e-6)
